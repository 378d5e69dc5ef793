"""scripts/sass_diff.py on the CPU: its reading of cuobjdump's listing, its comparison, and that
NVRTC plus cuobjdump tell one kernel's machine code from another's. The whole comparison of a
change against a revision is ``PYTHONPATH=. python scripts/sass_diff.py --base REV``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import need, required

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import sass_diff  # noqa: E402  (scripts/sass_diff.py)

# cuobjdump -sass of two functions as cuobjdump 13.5 prints them (its wide columns narrowed).
LISTING = """
	code for sm_90
		Function : _Z3addPf
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;            /* 0x00000a00ff017b82 */
            /* 0x000ff00000000800 */
        /*0010*/                   EXIT ;            /* 0x000000000000794d */
            /* 0x000fea0003800000 */
        ..........

		Function : _Z5otherv
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   EXIT ;            /* 0x000000000000794d */
            /* 0x000fea0003800000 */
"""


def test_listing_is_split_by_function_with_both_encoding_words():
    got = sass_diff.parse_sass(LISTING, {"_Z3addPf": "add<float>"})
    assert got == {
        "add<float>": [
            "LDC R1, c[0x0][0x28] ;  0x00000a00ff017b82 0x000ff00000000800",
            "EXIT ;  0x000000000000794d 0x000fea0003800000",
        ],
        "_Z5otherv": ["EXIT ;  0x000000000000794d 0x000fea0003800000"],
    }


def test_scheduling_bits_alone_make_a_difference():
    changed = LISTING.replace("0x000fea0003800000", "0x000fe20003800000", 1)
    assert sass_diff.parse_sass(changed, {}) != sass_diff.parse_sass(LISTING, {})


def test_a_specialization_matches_where_some_compile_of_each_side_agrees():
    a, b, c = ("X",), ("Y",), ("Z",)
    base = {"k.cu: one": {a}, "k.cu: two": {a, b}, "k.cu: three": {a}, "k.cu: gone": {a}}
    here = {"k.cu: one": {a}, "k.cu: two": {b, c}, "k.cu: three": {c}, "k.cu: new": {a}}
    assert sass_diff.differing(base, here) == ["k.cu: three"]


@pytest.fixture(scope="module")
def cuobjdump() -> str:
    need("cuda.bindings.nvrtc", "nvrtc")
    try:
        return sass_diff.find_cuobjdump()
    except FileNotFoundError as e:
        if required("cuobjdump"):
            pytest.fail(f"{e} (CUPYCONVT_REQUIRE_CUOBJDUMP=1)")
        pytest.skip(str(e))


def _layout_module() -> dict:
    mods = sass_diff.list_modules(sass_diff.ROOT)
    return next(m for m in mods if m["filename"] == "layout.cu")


def test_every_specialization_of_a_module_gets_a_listing(cuobjdump):
    module = _layout_module()
    got = sass_diff.compile_sass(module, "sm_90", cuobjdump)
    assert set(got) == set(module["names"]) and len(got) >= 2
    assert all(len(v) > 20 and all("  0x" in line for line in v) for v in got.values())


def test_a_changed_kernel_compiles_to_other_code(cuobjdump):
    module = _layout_module()
    tile = "constexpr int TILE = 64;"
    assert module["source"].count(tile) == 1
    changed = {**module, "source": module["source"].replace(tile, "constexpr int TILE = 32;")}
    before = sass_diff.compile_sass(module, "sm_90", cuobjdump)
    after = sass_diff.compile_sass(changed, "sm_90", cuobjdump)
    assert all(before[n] != after[n] for n in module["names"])
