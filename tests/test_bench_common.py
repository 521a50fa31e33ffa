"""bench.common, what the bench scripts share: the machine description with the CPU's ISA flags,
the text table, the JSON writer and best-of timing. No timing is asserted."""

import json
from pathlib import Path

from bench import common

CPUINFO = """processor\t: 0
model name\t: Some CPU
flags\t\t: fpu sse2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni avx512_bf16 amx_tile
bugs\t\t: spectre_v1

processor\t: 1
model name\t: Some CPU
flags\t\t: fpu sse2
"""


def test_cpu_flags_are_the_kernel_ones_present_in_a_fixed_order():
    assert common.cpu_flags(CPUINFO) == ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                                         "avx512_vnni", "avx512_bf16", "amx_tile"]  # the first CPU's line
    assert common.cpu_flags("flags\t: fpu sse2 sse4_2\n") == []
    assert common.cpu_flags("Features\t: fp asimd\n") is None  # no x86 flags line (e.g. an ARM CPU)
    assert common.flags_text({"cpu_flags": ["avx2", "fma"]}) == "CPU flags: avx2 fma"
    assert common.flags_text({"cpu_flags": []}) == "CPU flags: none"
    assert common.flags_text({"cpu_flags": None}) == "CPU flags: unknown"


def test_machine_info_reports_this_cpus_flags():
    machine = common.machine_info()
    json.dumps(machine)  # what every bench writes
    flags = machine["cpu_flags"]
    if Path("/proc/cpuinfo").exists() and "flags" in Path("/proc/cpuinfo").read_text():
        assert flags == common.cpu_flags() and set(flags) <= set(common.KERNEL_FLAGS)
    assert machine["cpus_usable"] >= 1 and machine["jax_devices"]


def test_format_table_aligns_the_first_column_left_and_the_rest_right():
    table = common.format_table(["name", "ms"], [["a", 1.5], ["longer", "12.25"]])
    assert table.splitlines() == ["name   |    ms",
                                  "-------+------",
                                  "a      |   1.5",
                                  "longer | 12.25"]


def test_write_json_and_best_of(tmp_path, capsys):
    out = tmp_path / "sub" / "r.json"
    common.write_json({"a": [1, 2]}, out)
    assert json.loads(out.read_text()) == {"a": [1, 2]} and f"wrote {out}" in capsys.readouterr().out
    calls = []
    assert common.best_of(lambda: calls.append(1), 3) >= 0 and len(calls) == 3


def test_quant_quality_modes_keep_labels_that_hold_a_comma():
    from bench.quant_quality import LM_MODES, wanted_modes

    labels = [label for label, *_ in LM_MODES]
    assert "int4 g=32, float embedding" in labels and "int4 g=32, int4 embedding" in labels
    assert wanted_modes("int8,int4 g=32, float embedding,int4 g=32, int4 embedding") == {
        "int8", "int4 g=32, float embedding", "int4 g=32, int4 embedding"}
    assert wanted_modes(",".join(labels)) == set(labels)
