"""Recipe files: round trip, identical bytes, safetensors compatibility, clear errors, atomic writes."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from runtime import Recipe, RecipeError, load
from runtime.recipe import from_bytes

FINGERPRINT = {
    "model_type": "llava", "num_layers": 4, "hidden_size": 64, "num_heads": 4,
    "num_kv_heads": 2, "visual_tokens": 10, "config_hash": "00112233aabbccdd",
}


def _recipe(**overrides):
    fields = dict(keep_count=np.array([10, 7, 7, 3]), scorer="fitprune", fingerprint=FINGERPRINT,
                  provenance={"budget": 0.5, "search": "optimal", "nested": {"b": 1, "a": [1, 2]}})
    fields.update(overrides)
    return Recipe(**fields)


def test_round_trip_keeps_every_field(tmp_path):
    recipe = _recipe()
    loaded = load(recipe.save(tmp_path / "r.safetensors"))
    assert loaded.keep_count.tolist() == [10, 7, 7, 3]
    assert np.array_equal(loaded.keep_ratio, np.array([1.0, 0.7, 0.7, 0.3], dtype=np.float32))
    assert (loaded.scorer, loaded.head_reduce, loaded.pre_llm) == ("fitprune", "max", {"method": "none"})
    assert loaded.fingerprint == FINGERPRINT and loaded.provenance == recipe.provenance
    assert loaded.pruning_layers == [1, 3]


def test_same_recipe_gives_identical_bytes_across_processes(tmp_path):
    code = (
        "import numpy as np, sys; from runtime import Recipe; "
        f"Recipe(keep_count=np.array([10,7,7,3]), scorer='fitprune', fingerprint={FINGERPRINT!r}, "
        "provenance={'z': 1, 'a': {'y': 2, 'b': 3}, 'm': 0.1}).save(sys.argv[1])"
    )
    paths = [tmp_path / f"{i}.safetensors" for i in range(2)]
    for path in paths:
        subprocess.run([sys.executable, "-c", code, str(path)], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_file_is_plain_safetensors(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    path = _recipe().save(tmp_path / "r.safetensors")
    arrays = load_file(str(path))
    assert arrays["keep_count"].dtype == np.int32 and arrays["keep_ratio"].dtype == np.float32
    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "pt" and metadata["recipe_compiler.schema"] == "1"
    assert json.loads(metadata["recipe_compiler.fingerprint"]) == FINGERPRINT


@pytest.mark.parametrize("counts, scale", [(576, 576), (1152, 1152), (288, 288)])
def test_ratios_scale_to_other_image_sizes(counts, scale):
    fingerprint = dict(FINGERPRINT, num_layers=3, visual_tokens=576)
    recipe = Recipe(keep_count=np.array([576, 300, 40]), scorer="fitprune", fingerprint=fingerprint)
    expected = {576: [576, 300, 40], 1152: [1152, 600, 80], 288: [288, 150, 20]}[counts]
    assert recipe.keep_counts_for(scale).tolist() == expected


def _header(data: bytes) -> dict:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])


def _with_header(data: bytes, mutate) -> bytes:
    header = _header(data)
    (n,) = struct.unpack("<Q", data[:8])
    mutate(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def _meta(key, value):
    def mutate(header):
        if value is None:
            header["__metadata__"].pop(key)
        else:
            header["__metadata__"][key] = value
    return mutate


def _with_raw_header(data: bytes, edit) -> bytes:
    """Edit the header's JSON text itself (json.dumps cannot write a repeated key)."""
    (n,) = struct.unpack("<Q", data[:8])
    raw = edit(data[8 : 8 + n].decode().rstrip()).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def _repeat_tensor(text: str) -> str:
    header = json.loads(text)
    entry = json.dumps(dict(header["keep_count"], shape=[2]), separators=(",", ":"))
    return text.replace("{", '{"keep_count":' + entry + ",", 1)  # the same key once more, first


def _repeat_meta(key: str, value: str):
    def edit(text: str) -> str:
        return text.replace('"__metadata__":{', '"__metadata__":{' + json.dumps(key) + ":" + json.dumps(value) + ",", 1)
    return edit


def _provenance(text: str):
    return _with_header(GOOD, _meta("recipe_compiler.provenance", text))


GOOD = _recipe().to_bytes()
BAD_FILES = {
    "empty": (b"", "too short"),
    "truncated": (GOOD[: len(GOOD) - 5], "truncated"),
    "random bytes": (os.urandom(64), "header length"),
    "huge header length": (struct.pack("<Q", 1 << 40) + b"{}", "header length"),
    "header not json": (struct.pack("<Q", 8) + b"{not js}", "not valid JSON"),
    "header not an object": (struct.pack("<Q", 8) + b"[1,2,3] ", "not a JSON object"),
    "foreign safetensors": (_with_header(GOOD, lambda h: h.pop("__metadata__")), "not written by recipe-compiler"),
    "unknown schema": (_with_header(GOOD, _meta("recipe_compiler.schema", "9")), "schema '9' is not supported"),
    "missing fingerprint": (_with_header(GOOD, _meta("recipe_compiler.fingerprint", None)), "fingerprint is missing"),
    "fingerprint not json": (_with_header(GOOD, _meta("recipe_compiler.fingerprint", "{oops")), "not valid JSON"),
    "unknown scorer": (_with_header(GOOD, _meta("recipe_compiler.scorer", "magic")), "scorer 'magic' is unknown"),
    "unknown pre-llm": (_with_header(GOOD, _meta("recipe_compiler.pre_llm", '{"method":"g-prune"}')), "pre-LLM stage 'g-prune'"),
    "wrong dtype": (_with_header(GOOD, lambda h: h["keep_count"].update(dtype="F32")), "dtype 'F32'"),
    "wrong shape": (_with_header(GOOD, lambda h: h["keep_count"].update(shape=[2, 2])), "shape"),
    "offsets outside": (_with_header(GOOD, lambda h: h["keep_count"].update(data_offsets=[0, 4000])), "data_offsets"),
    "missing tensor": (_with_header(GOOD, lambda h: h.pop("keep_ratio")), "'keep_ratio' is missing"),
    # Provenance: informational, but a file that claims nonsense is corrupt or forged.
    "provenance budget a word": (_provenance('{"budget":"lots","flops_fraction":-3}'), r"provenance budget must be a number in \(0, 1\], got 'lots'"),
    "provenance flops negative": (_provenance('{"budget":0.5,"flops_fraction":-3}'), r"provenance flops_fraction must be a number in \[0, 1\]"),
    "provenance flops above one": (_provenance('{"flops_fraction":1.5}'), "provenance flops_fraction must be"),
    "provenance budget zero": (_provenance('{"budget":0}'), "provenance budget must be"),
    "provenance budget above one": (_provenance('{"budget":1.01}'), "provenance budget must be"),
    "provenance budget a boolean": (_provenance('{"budget":true}'), "provenance budget must be"),
    "provenance kl negative": (_provenance('{"kl":-0.1}'), "provenance kl must be a finite number >= 0"),
    "provenance divergence a list": (_provenance('{"divergence":[1]}'), "provenance divergence must be a finite number >= 0"),
    "provenance top1 above one": (_provenance('{"top1_agreement":2}'), r"provenance top1_agreement must be a number in \[0, 1\]"),
    "provenance search a number": (_provenance('{"search":3}'), "provenance search must be a non-empty string"),
    "provenance search params a string": (_provenance('{"search_params":"alpha"}'), "provenance search_params must be a JSON object"),
    "provenance head reduce unknown": (_provenance('{"head_reduce":"sum"}'), "provenance head_reduce must be one of max, mean"),
    "provenance samples zero": (_provenance('{"calibration":{"samples":0}}'), "provenance calibration must be"),
    "provenance versions numbers": (_provenance('{"versions":{"torch":2}}'), "provenance versions must be"),
    "provenance not an object": (_provenance("[1]"), "provenance is not a JSON object"),
    # A repeated key: JSON readers keep the first or the last, so two tools could read two recipes.
    "header repeats a tensor key": (_with_raw_header(GOOD, _repeat_tensor), "header repeats the key 'keep_count'"),
    "metadata repeats a key": (_with_raw_header(GOOD, _repeat_meta("recipe_compiler.scorer", "last-token")),
                               "header repeats the key 'recipe_compiler.scorer'"),
    "provenance repeats a key": (_provenance('{"budget":0.5,"budget":0.9}'), "metadata recipe_compiler.provenance repeats the key 'budget'"),
    "fingerprint repeats a key": (_with_header(GOOD, _meta("recipe_compiler.fingerprint", json.dumps(FINGERPRINT)[:-1] + ',"num_layers":5}')),
                                  "metadata recipe_compiler.fingerprint repeats the key 'num_layers'"),
    "nested key repeated": (_provenance('{"search_params":{"alpha":0.5,"alpha":0.6}}'), "repeats the key 'alpha'"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files_raise_recipe_error_naming_the_problem(tmp_path, name):
    data, reason = BAD_FILES[name]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(RecipeError, match=reason) as info:
        load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "counts, reason",
    [
        ([10, 7, 8, 3], "non-increasing"),
        ([9, 7, 7, 3], r"keep_count\[0\] must be 10"),
        ([10, 7, 7, -1], r"in \[0, 10\]"),
        ([10, 7, 7], "3 entries but the model has 4 layers"),
    ],
)
def test_inconsistent_schedules_are_rejected(counts, reason):
    with pytest.raises(RecipeError, match=reason):
        _recipe(keep_count=np.array(counts))
    # The same schedule smuggled into a file is rejected on load too.
    good = _recipe()
    data = bytearray(good.to_bytes())
    if len(counts) == 4:
        (n,) = struct.unpack("<Q", data[:8])
        begin = 8 + n + _header(bytes(data))["keep_count"]["data_offsets"][0]
        data[begin : begin + 16] = np.array(counts, dtype="<i4").tobytes()
        with pytest.raises(RecipeError):
            from_bytes(bytes(data))


def test_edited_ratio_is_detected():
    data = bytearray(GOOD)
    (n,) = struct.unpack("<Q", data[:8])
    begin = 8 + n + _header(GOOD)["keep_ratio"]["data_offsets"][0]
    data[begin + 4 : begin + 8] = np.array([0.5], dtype="<f4").tobytes()
    with pytest.raises(RecipeError, match="keep_ratio disagrees"):
        from_bytes(bytes(data))


def test_missing_and_directory_paths(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load(tmp_path / "nope.safetensors")
    with pytest.raises(RecipeError, match="is a directory"):
        load(tmp_path)


def test_unwritable_directory_gives_recipe_error_and_leaves_nothing(tmp_path, monkeypatch):
    directory = tmp_path / "ro"
    directory.mkdir()
    directory.chmod(0o500)
    if os.geteuid() == 0:  # root ignores directory permissions: make the temp file fail as the kernel would for a user
        import tempfile

        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(directory))

        monkeypatch.setattr(tempfile, "mkstemp", denied)
    try:
        with pytest.raises(RecipeError, match="cannot write recipe"):
            _recipe().save(directory / "r.safetensors")
        assert list(directory.iterdir()) == []
    finally:
        directory.chmod(0o700)


def test_missing_directory_gives_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="cannot write recipe"):
        _recipe().save(tmp_path / "no" / "such" / "r.safetensors")


def test_overwrite_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "r.safetensors"
    _recipe().save(path)
    _recipe(keep_count=np.array([10, 5, 5, 5])).save(path)
    assert load(path).keep_count.tolist() == [10, 5, 5, 5]
    assert [p.name for p in tmp_path.iterdir()] == ["r.safetensors"]


def test_write_error_gives_one_line_recipe_error_and_leaves_nothing(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(RecipeError, match="cannot write recipe") as info:
        _recipe().save(blocker / "r.safetensors")
    assert "\n" not in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


# ------------------------------------------------------------------------------ provenance values
GOOD_PROVENANCE = {"budget": 0.45, "flops_fraction": 0.449999999, "divergence": 3.9, "kl": 0.0, "top1_agreement": 1.0,
                   "search": "optimal", "search_params": {"grid": 11}, "head_reduce": "max",
                   "calibration": {"fingerprint": "ab" * 32, "samples": 30}, "versions": {"torch": "2.13.0"},
                   "source": "FitPrune reference code", "anything else": [1, {"a": None}]}


@pytest.mark.parametrize("key, value", [
    ("budget", "lots"), ("budget", -0.1), ("budget", 0), ("budget", 1.5), ("budget", None), ("budget", float("nan")),
    ("flops_fraction", -3), ("flops_fraction", 1.01), ("flops_fraction", float("inf")), ("flops_fraction", "0.4"),
    ("divergence", -1e-3), ("kl", -1), ("kl", True), ("top1_agreement", 1.5), ("top1_agreement", -0.5),
    ("search", ""), ("search", 7), ("search_params", [1]), ("head_reduce", "min"), ("calibration", {"samples": -1}),
    ("calibration", "30"), ("versions", ["2.13"]), ("source", None), ("anything else", object()),
])
def test_recipes_refuse_provenance_of_the_wrong_type_or_range(key, value):
    with pytest.raises(RecipeError, match="provenance") as info:
        _recipe(provenance=dict(GOOD_PROVENANCE, **{key: value}))
    assert "\n" not in str(info.value)


def test_the_provenance_the_compiler_writes_round_trips():
    recipe = _recipe(provenance=GOOD_PROVENANCE)
    assert from_bytes(recipe.to_bytes()).provenance == GOOD_PROVENANCE
    assert _recipe(provenance={"budget": 1.0, "flops_fraction": 1.0 + 1e-9}).provenance["flops_fraction"] > 1  # rounding slack


# ------------------------------------------------------------------ writing over a non-regular file
@pytest.fixture
def refuse_replacing_devices(monkeypatch):
    """Fail, never replace, if anything renames a file onto a device under /dev (the writer must refuse first)."""
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if os.path.realpath(dst).startswith("/dev/"):
            raise AssertionError(f"os.replace onto {dst}: write_atomic let a device through")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("kind", ["fifo", "/dev/null", "symlink to /dev/null"])
def test_saving_over_a_device_or_fifo_raises_recipe_error_and_leaves_it_alone(tmp_path, refuse_replacing_devices, kind):
    import stat

    if kind == "fifo":
        target = tmp_path / "pipe.safetensors"
        os.mkfifo(target)
    elif kind == "/dev/null":
        target = "/dev/null"
    else:
        target = tmp_path / "link.safetensors"
        target.symlink_to("/dev/null")
    before = stat.S_IFMT(os.stat(target).st_mode)
    with pytest.raises(RecipeError, match="not a regular file") as info:
        _recipe().save(target)
    assert type(info.value) is RecipeError and str(target) in str(info.value) and "\n" not in str(info.value)
    assert stat.S_IFMT(os.stat(target).st_mode) == before
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_saving_statistics_over_a_fifo_raises_statistics_error(tmp_path):
    import stat

    from recipe_compiler.errors import StatisticsError
    from recipe_compiler.statistics import Statistics, save_statistics

    target = tmp_path / "stats.safetensors"
    os.mkfifo(target)
    zeros = np.zeros((1, 2, 3), dtype=np.float32)
    stats = Statistics(zeros, zeros, zeros, np.array([3]), np.array([2]), np.array([9]))
    with pytest.raises(StatisticsError, match="not a regular file"):
        save_statistics(stats, target)
    assert stat.S_ISFIFO(os.stat(target).st_mode)


def test_reading_statistics_from_a_fifo_raises_statistics_error_without_blocking(tmp_path):
    target = tmp_path / "stats.safetensors"
    os.mkfifo(target)  # opening it for reading waits for a writer forever, deaf to signals
    code = ("import sys; from recipe_compiler.errors import StatisticsError; from recipe_compiler.statistics import load_statistics\n"
            "try:\n    load_statistics(sys.argv[1])\nexcept StatisticsError as exc:\n    print(exc)")
    try:  # in a child, so a regression hangs the child (killed at the timeout), not the suite
        out = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=60,
                             cwd=os.path.dirname(os.path.dirname(__file__)))
    except subprocess.TimeoutExpired:
        pytest.fail("load_statistics blocked on a FIFO")
    assert out.returncode == 0, out.stderr
    assert f"statistics path {target} is a FIFO (named pipe), not a statistics file" in out.stdout


_SAVE_STATS = """
import sys
import numpy as np
from recipe_compiler.statistics import Statistics, save_statistics

rng = np.random.default_rng(0)
cross, self_attn, last = (rng.random((2, 3, 4), dtype=np.float32) for _ in range(3))
prellm = {"gprune": rng.random((2, 4), dtype=np.float32), "view": np.zeros((2, 4), np.int64),
          "grid_row": np.arange(8, dtype=np.int64).reshape(2, 4)}
stats = Statistics(cross, self_attn, last, np.array([4, 3]), np.array([5, 6]), np.array([12, 11]), head_reduce="mean",
                   model_fingerprint='{"model_type":"llava"}', calibration_fingerprint="abc", prellm=prellm,
                   prellm_params='{"feature_layer":-2}')
save_statistics(stats, sys.argv[1])
"""


def test_save_statistics_gives_the_same_bytes_for_the_same_statistics(tmp_path):
    # The safetensors library writes its metadata in hash order, which changes from process to process:
    # save in several processes, as several `--save-stats` runs would.
    from recipe_compiler.statistics import load_statistics

    paths = [tmp_path / f"s{i}.safetensors" for i in range(4)]
    for path in paths:
        subprocess.run([sys.executable, "-c", _SAVE_STATS, str(path)], check=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    first = paths[0].read_bytes()
    assert all(path.read_bytes() == first for path in paths[1:])
    again = load_statistics(paths[0])  # and the safetensors library still reads it
    assert again.head_reduce == "mean" and again.calibration_fingerprint == "abc"
    assert again.prellm["grid_row"].dtype == np.int64 and again.prellm["grid_row"].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert again.n_visual.tolist() == [4, 3] and again.cross.dtype == np.float32
