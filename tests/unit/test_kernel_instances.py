"""The templated kernels compile for sm_90 with NVRTC on a machine without a GPU, for every block type and each
GEMV mode (the instances in gdsllm_kernels.CHECK_INSTANCES): a plain compile of a .cu file instantiates no
template, so this is what catches an error inside one."""

import pytest

from gdsllm_kernels import CHECK_INSTANCES, KERNEL_DIR, compile_for_arch, kernel_sources


@pytest.mark.parametrize("file_name", sorted(CHECK_INSTANCES))
def test_template_instances_compile(nvrtc, file_name):
    cubin = compile_for_arch(KERNEL_DIR / file_name)
    assert cubin[:4] == b"\x7fELF"
    for name in CHECK_INSTANCES[file_name]:  # mangled names carry the template's base name
        assert name.split("<")[0].encode() in cubin


def test_every_source_is_listed_or_plain():
    templated = {p.name for p in kernel_sources() if "template <" in p.read_text()}
    assert templated <= set(CHECK_INSTANCES), f"templated sources without check instances: {templated - set(CHECK_INSTANCES)}"


def test_compile_error_names_the_file(nvrtc, tmp_path):
    broken = tmp_path / "broken.cu"
    broken.write_text('extern "C" __global__ void k(float* x) { x[0] = undefined_name; }\n')
    with pytest.raises(RuntimeError, match="broken.cu"):
        compile_for_arch(broken)
