"""Recipe loader fuzzing: thousands of corrupt files give RecipeError / RecipeMismatchError, nothing else.

Seeded mutations of valid recipes written by our own writer (tiny-llava and tiny-llava-next
fingerprints, every pre-LLM stage), including provenance values of the wrong type or range and
keys repeated anywhere in the header (both must be refused). Each file goes through :func:`runtime.load` with ``open``
wrapped to count the bytes asked for, so the test also proves the loader checks the header
length before reading the header, and the tensor offsets before reading the data. Loaded
recipes are checked against tiny-llava: either they fit it or ``check_model`` raises
:class:`RecipeMismatchError`.
"""
from __future__ import annotations

import json
import signal
import struct
import time
from collections import Counter
from contextlib import contextmanager

import numpy as np
import pytest

import runtime.recipe as recipe_module
from runtime import Recipe, RecipeError, RecipeMismatchError, load
from runtime.families import model_fingerprint

SEED = 20261122
MAX_DATA_BYTES = 2 * 4 * recipe_module._MAX_LAYERS  # keep_count + keep_ratio of the longest legal recipe
CASE_SECONDS = 2.0  # a case taking this long counts as a hang
TOTAL_SECONDS = 20.0


# ----------------------------------------------------------------------------- valid bases


@pytest.fixture(scope="module")
def models(tiny):
    from recipe_compiler.models import build_tiny_llava_next

    return {"llava": tiny.model, "llava_next": build_tiny_llava_next(seed=0).model}


def base_recipes(fingerprints: dict) -> list[Recipe]:
    """Valid recipes covering every field the loader reads, for each model."""
    out = []
    for fp in fingerprints.values():
        L, v = fp["num_layers"], fp["visual_tokens"]
        steps = np.linspace(v, v // 5, L).astype(int)
        prov = {"budget": 0.5, "search": "optimal", "search_params": {"grid": v + 1}, "versions": {"torch": "x"}}
        out += [
            Recipe.keep_all(fp),
            Recipe(keep_count=steps, scorer="fitprune", fingerprint=fp, provenance=prov),
            Recipe(keep_count=steps, scorer="last-token", fingerprint=fp, head_reduce="mean",
                   pre_llm={"method": "g-prune", "keep_ratio": 0.5, "params": {"threshold": 0.5, "temperature": 0.03, "steps": 5}}),
            Recipe(keep_count=steps, scorer="text-mean", fingerprint=fp, pre_llm={"method": "fopru-row", "keep_ratio": 0.25, "params": {}}),
            Recipe(keep_count=[v] * 2 + [int(np.floor(0.3 * v + 0.5))] * (L - 2), scorer="text-mean", fingerprint=fp,
                   pre_llm={"method": "cls-inflection", "params": {"stage2_layer": 2, "stage2_ratio": 0.3}}),
        ]
    return out


# ----------------------------------------------------------------------------- byte helpers


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header, body: bytes, raw: bytes | None = None) -> bytes:
    """Re-encode a (possibly broken) header as the writer would: JSON padded to 8 bytes."""
    raw = json.dumps(header, separators=(",", ":")).encode() if raw is None else raw
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def with_meta(data: bytes, key: str, value) -> bytes:
    header, body = split(data)
    if value is _DELETE:
        header["__metadata__"].pop(key, None)
    else:
        header["__metadata__"][key] = value
    return join(header, body)


_DELETE = object()
P = "recipe_compiler."


# ----------------------------------------------------------------------------- mutations by category

# Values that are wrong wherever a JSON value is expected: types, signs, sizes, non-finite numbers.
JUNK = [None, True, False, 0, -1, 1.5, 2**31, 2**63, 10**400, float("nan"), float("inf"), "", "x", "1", [], [1], {}, {"a": 1}]


def truncated(rng, base: bytes):
    (n,) = struct.unpack("<Q", base[:8])
    fixed = [0, 1, 7, 8, 9, 8 + n - 1, 8 + n, 8 + n + 1, len(base) - 1]
    for cut in fixed + rng.integers(0, len(base), 40).tolist():
        yield base[:cut]


def bit_flips(rng, base: bytes):
    (n,) = struct.unpack("<Q", base[:8])
    for i in range(120):
        data = bytearray(base)
        # Half in the header length + JSON, half in the data section, 1 to 3 bits each.
        lo, hi = (0, 8 + n) if i % 2 else (8 + n, len(base))
        for pos in rng.integers(lo, hi, rng.integers(1, 4)).tolist():
            data[pos] ^= 1 << int(rng.integers(0, 8))
        yield bytes(data)


def splices(rng, base: bytes):
    for i in range(30):
        data = bytearray(base)
        pos = int(rng.integers(0, len(data)))
        width = int(rng.integers(1, 16))
        kind = i % 3
        if kind == 0:  # overwrite with random bytes
            data[pos : pos + width] = rng.integers(0, 256, width, dtype=np.uint8).tobytes()
        elif kind == 1:  # insert
            data[pos:pos] = rng.integers(0, 256, width, dtype=np.uint8).tobytes()
        else:  # delete
            del data[pos : pos + width]
        yield bytes(data)


def header_lengths(rng, base: bytes):
    """The 8-byte header size: huge, one past the file, off by one, zero, over the cap."""
    size = len(base)
    (n,) = struct.unpack("<Q", base[:8])
    rest = base[8:]
    for value in (2**60, 2**64 - 1, 2**63, size - 8 + 1, size + 1, recipe_module._MAX_HEADER_BYTES + 1, 0, 1, 7, n - 1, n + 1, n - 8, n + 8):
        yield struct.pack("<Q", value) + rest
    # A file really larger than the cap, with a header length just over it: rejected unread.
    yield struct.pack("<Q", recipe_module._MAX_HEADER_BYTES + 8) + b" " * (recipe_module._MAX_HEADER_BYTES + 64)
    for value in rng.integers(size - 7, 2**62, 4, dtype=np.int64).tolist():
        yield struct.pack("<Q", int(value)) + rest


def header_json(rng, base: bytes):
    header, body = split(base)
    raw = json.dumps(header, separators=(",", ":")).encode()
    texts = [
        b"", b" ", b"null", b"[]", b"[1,2,3]", b'"text"', b"1", b"NaN", b"{", b"}", b"{}", b'{"__metadata__":{}}',
        raw[: len(raw) // 2], raw + b"}", raw.replace(b'"', b"'", 1), b"\xff\xfe" + raw, raw[:-1] + b"\x80}",
        b"[" * 100_000 + b"]" * 100_000,  # deeper than the JSON parser's recursion limit
        b'{"a":' + b"9" * 5000 + b"}",  # longer than Python's int-string limit
        b'{"__metadata__":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    ]
    for text in texts:
        yield join(None, body, raw=text)
    for _ in range(12):  # a random JSON value in place of the header
        value = JUNK[int(rng.integers(0, len(JUNK)))]
        yield join(value, body)


def tensor_entries(rng, base: bytes):
    header, body = split(base)
    L = header["keep_count"]["shape"][0]
    dtypes = ["F32", "I32", "F16", "F64", "I64", "U8", "BOOL", "i32", "f32", "", None, 4, ["I32"]]
    shapes = [[], [L, 1], [1, L], [0], [-1], [L + 1], [L - 1], [True], [float(L)], [str(L)], [2**70], None, L, [recipe_module._MAX_LAYERS + 1]]
    spans = lambda e: e["data_offsets"]  # noqa: E731
    for name in ("keep_count", "keep_ratio"):
        other = "keep_ratio" if name == "keep_count" else "keep_count"
        entry = header[name]
        wrong = "F32" if name == "keep_count" else "I32"
        edits = [("dtype", d) for d in dtypes if d != entry["dtype"]]
        edits += [("dtype", wrong)]
        edits += [("shape", s) for s in shapes]
        b, e = spans(entry)
        edits += [
            ("data_offsets", o)
            for o in ([e, b], [b, e + 4], [b - 4, e - 4], [b + 4, e + 4], [-4, e], [b, 2**64], [10**400, 10**400 + 4 * L],
                      [float(b), float(e)], [True, e], [b], [b, e, e], None, "0,16", spans(header[other]))
        ]
        edits += [("extra", 1)]
        for field, value in edits:
            h = json.loads(json.dumps(header))
            if field == "extra":
                h[name]["extra"] = value  # harmless, as in safetensors: a different file but the same recipe
            else:
                h[name][field] = value
            yield join(h, body)
        h = json.loads(json.dumps(header))
        h.pop(name)
        yield join(h, body)
        h = json.loads(json.dumps(header))
        h[name] = JUNK[int(rng.integers(0, len(JUNK)))]
        yield join(h, body)
    # Extra tensors, and the two entries swapped.
    h = json.loads(json.dumps(header))
    h["bonus"] = {"dtype": "F32", "shape": [1], "data_offsets": [len(body), len(body) + 4]}
    yield join(h, body + b"\0" * 4)
    h = json.loads(json.dumps(header))
    h["keep_count"], h["keep_ratio"] = h["keep_ratio"], h["keep_count"]
    yield join(h, body)
    # Trailing bytes after the data section, small and large: rejected without reading them.
    yield base + b"\0" * 8
    yield base + b"\0" * (4 << 20)


def values(rng, recipe: Recipe):
    """Schedules a recipe cannot have, with keep_ratio recomputed so only the counts are wrong."""
    L, v = recipe.num_layers, recipe.reference_visual_tokens
    good = recipe.keep_count.astype(np.int64)
    bad_counts = [
        np.r_[good[:-1], -1], np.r_[good[:-1], v + 1], np.r_[v - 1, good[1:]], np.r_[v + 1, good[1:]],
        np.r_[good[0], good[1:][::-1]] if L > 2 and good[1] != good[-1] else np.r_[v, np.arange(L - 1)],
        np.full(L, -2**31), np.full(L, 2**31 - 1), np.r_[v, np.zeros(L - 2, int), v],
    ]
    for counts in bad_counts:
        yield _rewrite_data(recipe, counts.astype("<i4"), (counts.astype(np.float64) / v).astype("<f4"))
    # keep_ratio not what keep_count says: NaN, negative, infinite, increasing, off by one ulp.
    ratio = recipe.keep_ratio.astype("<f4")
    for change in ("nan", "neg", "inf", "increasing", "ulp", "random"):
        r = ratio.copy()
        i = int(rng.integers(0, L))
        if change == "nan":
            r[i] = np.nan
        elif change == "neg":
            r[i] = -r[i] - 0.5
        elif change == "inf":
            r[i] = np.inf
        elif change == "increasing":
            r = np.sort(r)
            if np.array_equal(r, ratio):
                r[-1] = 1.5
        elif change == "ulp":
            r[i] = np.nextafter(r[i], np.float32(2))
        else:
            r = rng.random(L).astype("<f4")
        yield _rewrite_data(recipe, recipe.keep_count.astype("<i4"), r)
    counts = rng.integers(-5, v + 5, L)
    counts[0] = v if rng.random() < 0.5 else counts[0]
    if np.all(np.diff(counts) <= 0) and 0 <= counts.min() and counts.max() <= v and counts[0] == v:
        counts[-1] = -1
    yield _rewrite_data(recipe, counts.astype("<i4"), (counts / v).astype("<f4"))


def _rewrite_data(recipe: Recipe, counts: np.ndarray, ratio: np.ndarray) -> bytes:
    header, body = split(recipe.to_bytes())
    blobs = {"keep_count": counts.tobytes(), "keep_ratio": ratio.tobytes()}
    out = bytearray(body)
    for name, blob in blobs.items():
        b, e = header[name]["data_offsets"]
        out[b:e] = blob
    return join(header, bytes(out))


SCHEMAS = ["0", "2", "", " 1", "1 ", "1.0", "01", "one", "10", "1\n", "\u0661"]  # \u0661: Arabic-Indic digit one


def schema_and_metadata(rng, base: bytes):
    for schema in SCHEMAS:
        yield with_meta(base, P + "schema", schema)
    yield with_meta(base, P + "schema", _DELETE)
    header, body = split(base)
    for value in JUNK + [["1"], {"schema": "1"}]:  # __metadata__ itself is junk
        h = json.loads(json.dumps(header))
        h["__metadata__"] = value
        yield join(h, body)
    h = json.loads(json.dumps(header))
    h.pop("__metadata__")
    yield join(h, body)
    for key in list(header["__metadata__"]):  # a metadata value that is not a string
        if key == "format":
            continue
        h = json.loads(json.dumps(header))
        h["__metadata__"][key] = [1, 2] if rng.random() < 0.5 else 1
        yield join(h, body)


FIELDS = ("fingerprint", "scorer", "head_reduce", "pre_llm", "provenance")


def metadata_fields(rng, recipe: Recipe):
    """Missing, non-JSON, wrongly typed or out-of-range fingerprint / scorer / stage / provenance."""
    base = recipe.to_bytes()
    for field in FIELDS:
        yield with_meta(base, P + field, _DELETE)
    for field in ("fingerprint", "pre_llm", "provenance"):
        for text in ("", "{", "nul", "[1,", '{"a":' + "9" * 5000 + "}", "[" * 100_000 + "]" * 100_000):
            yield with_meta(base, P + field, text)
    for text in ("", "FitPrune", "fitprune ", "none", "max", "x" * 10_000):
        yield with_meta(base, P + "scorer", text)
    for text in ("", "Max", "min", "sum", "fitprune"):
        yield with_meta(base, P + "head_reduce", text)
    fp = recipe.fingerprint
    for key in fp:
        for value in JUNK:
            if key in ("model_type", "config_hash") and isinstance(value, str) and value:
                continue  # any non-empty string is a valid (if foreign) model type / hash
            if key not in ("model_type", "config_hash") and type(value) is int and 0 < value < 2**31:
                continue
            yield with_meta(base, P + "fingerprint", _dumps_loose(dict(fp, **{key: value})))
        missing = dict(fp)
        missing.pop(key)
        yield with_meta(base, P + "fingerprint", json.dumps(missing))
    yield with_meta(base, P + "fingerprint", json.dumps(dict(fp, num_layers=fp["num_layers"] + 1)))
    yield with_meta(base, P + "fingerprint", json.dumps(dict(fp, visual_tokens=fp["visual_tokens"] + 1)))
    for value in JUNK + [{"budget": float("nan")}, {"kl": float("inf")}]:
        yield with_meta(base, P + "provenance", _dumps_loose(value))
    yield with_meta(base, P + "provenance", '{"kl":1e999}')
    stages = [
        {"method": "g-prune"}, {"method": "g-prune", "keep_ratio": 0.5}, {"method": "fopru-rank", "keep_ratio": 0.5, "params": {"a": 1}},
        {"method": "cls-inflection", "params": {"stage2_layer": 1}}, {"method": "cls-inflection", "params": {"stage2_layer": 99, "stage2_ratio": 0.3}},
        {"method": "none", "keep_ratio": 1.0}, {"method": "magic"}, {"method": None}, {}, [], "none",
        {"method": "g-prune", "keep_ratio": 0.5, "params": {"steps": 2.5}},
        {"method": "g-prune", "keep_ratio": 0.5, "params": {"temperature": 0}},
        {"method": "g-prune", "keep_ratio": 0.5, "params": {"threshold": 1.5}},
        {"method": "g-prune", "keep_ratio": 0.5, "params": {"temperature": 10**400}},  # would overflow a float at run time
        {"method": "g-prune", "keep_ratio": 0.5, "params": {"bogus": 1}},
        {"method": "g-prune", "keep_ratio": 0.5, "params": []},
        {"method": "fopru-row", "keep_ratio": 0.5, "params": {}, "extra": 1},
    ]
    for value in JUNK:
        stages.append({"method": "fopru-rank", "keep_ratio": value, "params": {}})
        stages.append({"method": "cls-inflection", "params": {"stage2_layer": 2, "stage2_ratio": value}})
        stages.append({"method": "cls-inflection", "params": {"stage2_layer": value, "stage2_ratio": 0.3}})
    for stage in stages:
        yield with_meta(base, P + "pre_llm", _dumps_loose(stage))


# Provenance values the loader must refuse, per key the compiler writes (other keys may hold any JSON).
PROVENANCE_BAD = {
    "budget": ["lots", -3, 0, 0.0, 1.0000001, 2, True, None, [0.5], {"v": 0.5}, 10**400, "0.5"],
    "flops_fraction": [-3, -1e-9, 1.5, 2, "0.4", None, False, [], 10**400],
    "divergence": [-1, -1e-12, "x", None, True, {}],
    "kl": [-0.5, "0", None, [0.1], True],
    "top1_agreement": [-0.1, 1.1, 2, "1", None, True],
    "search": ["", 0, None, ["optimal"], {"name": "optimal"}],
    "search_params": ["alpha", 1, None, [1, 2]],
    "head_reduce": ["sum", "", 1, None, ["max"]],
    "calibration": ["30", 30, None, {"samples": 0}, {"samples": -1}, {"samples": 1.5}, {"samples": True}, {"fingerprint": 7}],
    "versions": ["2.13", None, ["torch"], {"torch": 2}, {"torch": None}],
    "source": ["", 1, None, ["FitPrune"]],
}


def provenance_values(rng, recipe: Recipe):
    """A provenance whose known key has a wrong type or an out-of-range value (the rest valid)."""
    base = recipe.to_bytes()
    for key, values in PROVENANCE_BAD.items():
        for value in values:
            yield with_meta(base, P + "provenance", _dumps_loose(dict(recipe.provenance, **{key: value})))
    for value in (float("nan"), float("inf"), -float("inf")):  # another writer's NaN literals
        yield with_meta(base, P + "provenance", _dumps_loose(dict(recipe.provenance, kl=value)))


def _repeat_first_key(text: str, value_text: str | None = None) -> str:
    """``{"k":v,...}`` -> ``{"k":v2,"k":v,...}``: the object's first key once more, in front."""
    obj = json.loads(text)
    if not obj:
        return '{"budget":0.5,"budget":0.5}'
    key = next(iter(obj))
    value = value_text if value_text is not None else json.dumps(obj[key], separators=(",", ":"))
    return "{" + json.dumps(key) + ":" + value + "," + text[1:]


def duplicate_keys(rng, base: bytes):
    """The same key twice anywhere: the header, __metadata__, inside a metadata JSON string, nested."""
    (n,) = struct.unpack("<Q", base[:8])
    raw = base[8 : 8 + n].decode().rstrip()
    body = base[8 + n :]
    header = json.loads(raw)
    for name in ("keep_count", "keep_ratio"):  # a tensor key twice: same entry, or a different one first / last
        entry = json.dumps(header[name], separators=(",", ":"))
        other = json.dumps(dict(header[name], shape=[1]), separators=(",", ":"))
        for text in ('{"%s":%s,' % (name, entry) + raw[1:], '{"%s":%s,' % (name, other) + raw[1:], raw[:-1] + ',"%s":%s}' % (name, other)):
            yield join(None, body, raw=text.encode())
    meta = json.dumps(header["__metadata__"], separators=(",", ":"))
    yield join(None, body, raw=(raw[:-1] + ',"__metadata__":' + meta + "}").encode())  # __metadata__ twice
    for key, value in header["__metadata__"].items():  # a metadata key twice, with its own or another value
        for repeated in (value, "x"):
            text = raw.replace('"__metadata__":{', '"__metadata__":{' + json.dumps(key) + ":" + json.dumps(repeated) + ",", 1)
            yield join(None, body, raw=text.encode())
    for field in ("fingerprint", "pre_llm", "provenance"):  # a key twice inside a metadata JSON string
        text = header["__metadata__"][P + field]
        yield with_meta(base, P + field, _repeat_first_key(text))
        obj = json.loads(text)
        if isinstance(obj.get("params"), dict) and obj["params"]:  # nested: pre_llm.params
            params = json.dumps(obj["params"], separators=(",", ":"))
            yield with_meta(base, P + field, text.replace(params, _repeat_first_key(params), 1))


def _dumps_loose(value) -> str:
    """JSON as another writer might produce it (NaN / Infinity literals allowed)."""
    return json.dumps(value)


def other_models(rng, recipe: Recipe, fingerprints: dict):
    """Valid files for a model other than tiny-llava (another family, or one field changed)."""
    ours = fingerprints["llava"]
    if recipe.fingerprint == ours:
        for key in ("hidden_size", "num_heads", "num_kv_heads", "config_hash", "model_type"):
            value = ours[key] + 1 if isinstance(ours[key], int) else ours[key] + "x"
            fp = dict(ours, **{key: value})
            yield Recipe(keep_count=recipe.keep_count, scorer=recipe.scorer, fingerprint=fp, head_reduce=recipe.head_reduce,
                         pre_llm=recipe.pre_llm, provenance=recipe.provenance).to_bytes()
    else:
        yield recipe.to_bytes()


# ----------------------------------------------------------------------------- the run


class CountingFile:
    """A read-only file that records how many bytes each ``read`` asked for."""

    def __init__(self, handle, log: list):
        self._handle, self._log = handle, log

    def read(self, n: int = -1) -> bytes:
        self._log.append(n)
        return self._handle.read(n)

    def fileno(self) -> int:
        return self._handle.fileno()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


class Hang(Exception):
    pass


@contextmanager
def deadline(seconds: float):
    def on_alarm(signum, frame):
        raise Hang(f"a case ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# Files per valid base recipe and category (a seeded sample when a generator makes more): about
# 3,400 files in all, a few seconds of loading.
PER_BASE = {"truncated": 30, "bit-flip": 50, "splice": 30, "header-length": 20, "header-json": 40, "tensor-entries": 40,
            "values": 20, "schema": 25, "metadata-fields": 45, "provenance": 25, "duplicate-keys": 25, "other-model": 10}


def generate(fingerprints: dict) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(SEED)
    cases = []
    for recipe in base_recipes(fingerprints):
        data = recipe.to_bytes()
        made = {
            "truncated": truncated(rng, data), "bit-flip": bit_flips(rng, data), "splice": splices(rng, data),
            "header-length": header_lengths(rng, data), "header-json": header_json(rng, data),
            "tensor-entries": tensor_entries(rng, data), "values": values(rng, recipe),
            "schema": schema_and_metadata(rng, data), "metadata-fields": metadata_fields(rng, recipe),
            "provenance": provenance_values(rng, recipe), "duplicate-keys": duplicate_keys(rng, data),
            "other-model": other_models(rng, recipe, fingerprints),
        }
        for category, files in made.items():
            files = list(files)
            if len(files) > PER_BASE[category]:
                files = [files[i] for i in sorted(rng.choice(len(files), PER_BASE[category], replace=False))]
            cases += [(category, d) for d in files]
    return cases


# Categories built to be invalid must never load; the rest may hold harmless changes (a flipped
# bit in a provenance string), which must then be a genuinely valid recipe.
MUST_REJECT = {"truncated", "header-length", "header-json", "values", "schema", "provenance", "duplicate-keys"}
MUST_MISMATCH = {"other-model"}


def run_case(path, data: bytes, monkeypatch, tiny_model) -> tuple[str, BaseException | Recipe, list]:
    path.write_bytes(data)
    reads: list = []
    real_open = open
    monkeypatch.setattr(recipe_module, "open", lambda p, mode="r", *a, **k: CountingFile(real_open(p, mode, *a, **k), reads), raising=False)
    try:
        with deadline(CASE_SECONDS):
            recipe = load(path)
    except RecipeError as exc:  # RecipeMismatchError is a RecipeError, but load never raises it
        assert type(exc) is RecipeError, f"load raised {type(exc).__name__}: {exc}"
        return "rejected", exc, reads
    finally:
        monkeypatch.undo()
    try:
        recipe.check_model(tiny_model)
    except RecipeMismatchError as exc:
        return "mismatch", exc, reads
    return "valid", recipe, reads


def check_reads(data: bytes, reads: list) -> None:
    """The loader asks for 8 bytes, then the header only if its length fits, then the data only if it tiles."""
    if len(data) < 8:
        assert reads == [], reads
        return
    assert reads and reads[0] == 8, reads
    assert all(isinstance(n, int) and n >= 0 for n in reads), f"unbounded read: {reads}"
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > recipe_module._MAX_HEADER_BYTES:
        assert reads == [8], f"read {reads} after an impossible header length {n} in a {len(data)}-byte file"
        return
    assert len(reads) <= 3 and reads[1] == n, reads
    assert sum(reads[2:]) <= MAX_DATA_BYTES, f"read {reads[2:]} data bytes; no recipe has more than {MAX_DATA_BYTES}"


def check_genuinely_valid(recipe: Recipe) -> None:
    again = Recipe(keep_count=recipe.keep_count, scorer=recipe.scorer, fingerprint=recipe.fingerprint,
                   head_reduce=recipe.head_reduce, pre_llm=recipe.pre_llm, provenance=recipe.provenance)
    data = again.to_bytes()
    assert recipe_module.from_bytes(data).to_bytes() == data
    assert np.all(np.diff(recipe.keep_count) <= 0) and recipe.keep_count[0] == recipe.reference_visual_tokens
    assert np.all(np.isfinite(recipe.keep_ratio)) and np.all((recipe.keep_ratio >= 0) & (recipe.keep_ratio <= 1))


def test_fuzzed_recipe_files_only_raise_recipe_errors(tmp_path, models, monkeypatch, capsys):
    fingerprints = {name: model_fingerprint(model) for name, model in models.items()}
    cases = generate(fingerprints)
    assert len(cases) >= 2000, len(cases)
    assert len({data for _, data in cases}) >= 1900, "the generator repeats itself"
    counts: dict[str, Counter] = {}
    slowest, started = 0.0, time.perf_counter()
    path = tmp_path / "fuzz.safetensors"
    for index, (category, data) in enumerate(cases):
        t0 = time.perf_counter()
        try:
            outcome, result, reads = run_case(path, data, monkeypatch, models["llava"])
        except Exception as exc:  # noqa: BLE001 - anything else is the bug this test hunts
            pytest.fail(f"case {index} ({category}): load raised {type(exc).__name__}: {exc}", pytrace=False)
        slowest = max(slowest, time.perf_counter() - t0)
        counts.setdefault(category, Counter())[outcome] += 1
        where = f"case {index} ({category})"
        check_reads(data, reads)
        if outcome == "valid":
            assert category not in MUST_REJECT | MUST_MISMATCH, f"{where} loaded: {result}"
            check_genuinely_valid(result)
        else:
            message = str(result)
            assert "\n" not in message and len(message) < 600, f"{where}: message not one short line: {message[:300]!r}"
            if outcome == "rejected":
                assert str(path) in message, f"{where}: message does not name the file: {message}"
                assert category not in MUST_MISMATCH, f"{where}: a valid file for another model was rejected: {message}"
            else:
                assert category not in MUST_REJECT, f"{where} loaded: {message}"
    elapsed = time.perf_counter() - started

    totals = Counter()
    for c in counts.values():
        totals.update(c)
    lines = [f"recipe fuzz: {len(cases)} files in {elapsed:.1f} s (slowest case {slowest * 1000:.0f} ms)",
             f"{'category':<16}{'files':>7}{'RecipeError':>13}{'Mismatch':>10}{'valid':>7}"]
    for category in sorted(counts):
        c = counts[category]
        lines.append(f"{category:<16}{sum(c.values()):>7}{c['rejected']:>13}{c['mismatch']:>10}{c['valid']:>7}")
    lines.append(f"{'total':<16}{sum(totals.values()):>7}{totals['rejected']:>13}{totals['mismatch']:>10}{totals['valid']:>7}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))

    assert sum(totals.values()) == len(cases)
    assert totals["rejected"] + totals["mismatch"] >= 0.9 * len(cases)
    assert counts["other-model"]["mismatch"] == sum(counts["other-model"].values()) > 0
    assert elapsed < TOTAL_SECONDS, f"fuzz run took {elapsed:.1f} s"


@pytest.mark.parametrize("header_len", [2**60, 2**64 - 1, "size+1", "size-7", recipe_module._MAX_HEADER_BYTES + 1])
def test_impossible_header_length_is_rejected_before_reading_further(tmp_path, monkeypatch, header_len):
    data = Recipe.keep_all({"model_type": "llava", "num_layers": 2, "hidden_size": 8, "num_heads": 2,
                            "num_kv_heads": 2, "visual_tokens": 4, "config_hash": "0" * 16}).to_bytes()
    body = data[8:] + b" " * (recipe_module._MAX_HEADER_BYTES + 16)  # big enough that only the cap rejects the last case
    size = 8 + len(body)
    value = {"size+1": size + 1, "size-7": size - 7}.get(header_len, header_len)
    path = tmp_path / "r.safetensors"
    path.write_bytes(struct.pack("<Q", value) + body)
    reads: list = []
    real_open = open
    monkeypatch.setattr(recipe_module, "open", lambda p, mode="r": CountingFile(real_open(p, mode), reads), raising=False)
    with pytest.raises(RecipeError, match=f"header length {value} does not fit") as info:
        load(path)
    assert reads == [8] and type(info.value) is RecipeError


@pytest.mark.parametrize(
    "compiled_for, applied_to, expected",
    [
        ("llava", "llava_next", "model_type is 'llava' in the recipe but 'llava_next' in the model"),
        ("llava_next", "llava", "model_type is 'llava_next' in the recipe but 'llava' in the model"),
        ("llava", "bert", "recipe was compiled for 'llava': model type 'bert' is not supported"),
    ],
)
def test_recipe_from_a_file_for_another_model_raises_mismatch(models, compiled_for, applied_to, expected):
    recipe = recipe_module.from_bytes(Recipe.keep_all(model_fingerprint(models[compiled_for])).to_bytes())
    recipe.check_model(models[compiled_for])  # fits the model it was compiled for
    foreign = type("Foreign", (), {"config": type("Config", (), {"model_type": "bert"})()})()
    with pytest.raises(RecipeMismatchError, match=expected):
        recipe.check_model(models.get(applied_to, foreign))


@pytest.mark.parametrize("kind", ["fifo", "nul in path", "symlink loop"])
def test_special_paths_give_recipe_error_without_blocking(tmp_path, kind):
    import os

    path = tmp_path / "r.safetensors"
    if kind == "fifo":
        os.mkfifo(path)  # opening it would block until a writer appears
    elif kind == "symlink loop":
        os.symlink(path, path)
    else:
        path = str(path) + "\0x"
    with deadline(CASE_SECONDS), pytest.raises(RecipeError) as info:
        load(path)
    assert type(info.value) is RecipeError and "\n" not in str(info.value)
