"""The ``cpu`` backend (C++ gated blocks) against the gated model and the reference backend.

Random-weight models of every architecture with realistic BN statistics and thresholds
keeping 30-70% of the channels (:mod:`manidp.calibrate`); ImageNet models at small and odd
input sizes to keep the suite fast.  Every strategy is checked (``auto``: the whole network in
one native call, ``torch.classes.manidp.CpuNetwork``; then one ``gated_block`` op per block:
``instance``, the gathered conv (gconv, AVX-512 or AVX2) where the CPU has it, ``library``:
gathered weights + oneDNN, ``union``: batched convs over the union of active channels), and
each gconv kernel the CPU can run, forced with ``MANIDP_GCONV_ISA`` in a child process.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import calibrated, threshold_margin

from manidp.deploy import compile, ops
from manidp.deploy.cpu_backend import HAVE_GCONV

pytestmark = pytest.mark.skipif(not ops.HAVE_CPU_OPS, reason=f"manidp._C not built ({ops.IMPORT_ERROR!r})")


# (arch, input size, kept fraction, seed).  A deep random-weight ResNet can amplify fp32 rounding
# past the tolerance (some ResNet-110 draws by percents, even the model against itself in fp64):
# the seeds are draws that do not.
ARCHS = [("dyresnet20", (32, 32), 0.3, 0), ("dyresnet32", (32, 32), 0.7, 0), ("dyresnet56", (32, 32), 0.5, 0),
         ("dyresnet110", (32, 32), 0.35, 5), ("dyresnet18", (67, 53), 0.6, 0), ("dyresnet34", (48, 48), 0.5, 0)]
MODES = ["auto", "instance", "library", "union"]


class _Modes:
    """One compiled cpu engine, handed out once per strategy (the mode is a backend attribute)."""

    def __init__(self, engine, modes):
        self.engine, self.modes = engine, modes

    def values(self):
        for mode in self.modes:
            self.engine.backend.mode = mode
            yield self.engine

    def items(self):
        for mode in self.modes:
            self.engine.backend.mode = mode
            yield mode, self.engine

    def __getitem__(self, mode):
        self.engine.backend.mode = mode
        return self.engine


def engines(model, modes=MODES):
    """The reference engine and the cpu engine in each of ``modes``."""
    return compile(model, backend="reference"), _Modes(compile(model, backend="cpu"), modes)


def expected(model, ref, x):
    """What every backend must produce on ``x``: the gated model's logits, the reference's stats."""
    with torch.no_grad():
        return model(x), ref(x, return_stats=True)[1]


def check(engine, x, want):
    """Logits within 1e-4 (relative) of the gated model; active counts and MACs equal to the reference's."""
    logits, ref_stats = want
    with torch.no_grad():
        got, stats = engine(x, return_stats=True)
    rel = float((got - logits).abs().max() / logits.abs().max().clamp_min(1e-12))
    assert rel < 1e-4, f"relative error {rel:.3g}"
    assert torch.equal(stats["active"], ref_stats["active"])
    assert torch.equal(stats["macs"], ref_stats["macs"])
    return stats


def check_blocks(ref, engine, x):
    """Each block, on the reference's input to it, gives the reference's counts and output."""
    with torch.no_grad():
        h = ref.backend.prepare_input(ref._stem(ref.backend.prepare_stem_input(x)))
        for blk_ref, blk in zip(ref.blocks, engine.blocks):
            want = ref.backend.block(blk_ref, h)
            got = engine.backend.block(blk, h)
            assert torch.equal(got.cnt1, want.cnt1) and torch.equal(got.cnt2, want.cnt2)
            torch.testing.assert_close(got.out, want.out, rtol=1e-4, atol=1e-4)
            h = want.out


@pytest.mark.parametrize("arch,size,keep,seed", ARCHS)
def test_matches_gated_model_and_reference(arch, size, keep, seed):
    model, x = calibrated(arch, size, keep, n=3, seed=seed)
    ref, engs = engines(model)
    want = expected(model, ref, x)
    for mode, engine in engs.items():
        stats = check(engine, x, want)
        frac = stats["active"].float().mean() / torch.tensor([g.out_channels for g in model.gates()]).float().mean()
        assert 0.1 < frac < 0.95
    check_blocks(ref, engs["instance"], x)


def test_closed_and_open_gates():
    """|A1| = 0 (conv2 is its bias alone), |A2| = 0 (out = relu(shortcut)), every channel active."""
    model, x = calibrated("dyresnet18", (40, 40), 0.5, n=3)
    blocks = list(model.blocks())
    blocks[0].gate1.threshold.fill_(float("inf"))
    blocks[1].gate2.threshold.fill_(float("inf"))
    blocks[2].gate1.threshold.fill_(float("inf"))   # stride-2 block with shortcut conv
    blocks[2].gate2.threshold.fill_(float("inf"))
    for gate in (blocks[3].gate1, blocks[3].gate2, blocks[5].gate1):
        gate.fc2.weight.data.zero_()                # g = bias > 0 everywhere: every channel active
        gate.fc2.bias.data.fill_(1.0)
        gate.threshold.fill_(float("-inf"))
    ref, engs = engines(model)
    want = expected(model, ref, x)
    for engine in engs.values():
        active = check(engine, x, want)["active"]
        assert (active[:, [0, 3, 4, 5]] == 0).all()
        assert (active[:, 6] == 128).all() and (active[:, 7] == 128).all() and (active[:, 10] == 256).all()


def test_batch_with_a_different_count_per_instance():
    model, x = calibrated("dyresnet20", (32, 32), 0.5, n=8)
    ref, engs = engines(model)
    want = expected(model, ref, x)
    for engine in engs.values():
        stats = check(engine, x, want)
        assert len(set(stats["macs"].tolist())) == 8


# (29, 35) and (33, 31): 4 x 5 maps, 16 pixels in a vector and 4 as dot products (tail_pixels);
# (68, 68): 17 x 17 and 9 x 9 maps, one tail pixel each.
@pytest.mark.parametrize("size", [(29, 35), (7, 5), (33, 31), (68, 68)])
def test_batch_one_and_odd_sizes_imagenet(size):
    model, x = calibrated("dyresnet18", size, 0.5, n=2)
    ref, engs = engines(model, ["auto", "instance", "library"])
    want1 = expected(model, ref, x[:1])
    for engine in engs.values():
        check(engine, x[:1], want1)


def test_cifar_tiny_maps():
    """3x3 and 1x1 feature maps in the last stage (narrow rows in the gathered conv)."""
    model, x = calibrated("dyresnet20", (9, 5), 0.5, n=3)
    ref, engs = engines(model)
    want = expected(model, ref, x)
    for engine in engs.values():
        check(engine, x, want)



# Maps 32, 16, 8 and 4 pixels wide (a row boundary at the same lanes of every vector, or of every
# other one) that are not whole 64-pixel tiles: (12, 32) gives 12 x 32, 6 x 16 and 3 x 8 maps;
# (7, 16) gives 7 x 16, 4 x 8 and 2 x 4.
@pytest.mark.parametrize("size", [(12, 32), (7, 16)])
def test_cifar_maps_of_partial_tiles(size):
    model, x = calibrated("dyresnet20", size, 0.5, n=2)
    ref, engs = engines(model)
    want = expected(model, ref, x)
    for engine in engs.values():
        check(engine, x, want)

# Tail pixels of every count and a last tile of one vector: (5, 10) gives a 50-pixel map (48 in
# vectors, 2 as dot products), (9, 11) a 99-pixel one (3), (28, 28) maps of 784 pixels (12 tiles
# and one of a single vector, which the batch-1 threads split by cost), 196 (4) and 49 (1).
@pytest.mark.parametrize("size", [(5, 10), (9, 11), (28, 28)])
def test_cifar_tail_pixels_and_uneven_tiles(size):
    model, x = calibrated("dyresnet20", size, 0.5, n=2)
    ref, engs = engines(model)
    want = expected(model, ref, x)
    want1 = expected(model, ref, x[:1])
    for engine in engs.values():
        check(engine, x, want)
        check(engine, x[:1], want1)


# conv2's tail pixels read each weight row in place where its active columns are at least half
# the row, and copy those columns together where they are fewer (docs/DESIGN.md 7.6): 14 x 14
# and 7 x 7 maps with about 30% and 80% of the channels kept take both ways.
@pytest.mark.parametrize("keep", [0.3, 0.8])
def test_tail_pixels_with_few_and_many_active_columns(keep):
    model, x = calibrated("dyresnet20", (28, 28), keep, n=2)
    ref, engs = engines(model)
    want = expected(model, ref, x)
    want1 = expected(model, ref, x[:1])
    columns = want[1]["active"][:, 0::2][:, 3:]  # conv2's active columns, 14 x 14 and 7 x 7 stages
    half_or_more = 2 * columns >= torch.tensor([32] * 3 + [64] * 3)
    assert (half_or_more if keep > 0.5 else ~half_or_more).any()
    for engine in engs.values():
        check(engine, x, want)
        check(engine, x[:1], want1)


def test_imagenet_stem_max_pool_with_a_nan_pixel():
    """The one-call network max-pools the stem itself; an image with a NaN pixel gives the
    reference's logits and counts, and leaves the other image of the batch alone."""
    model, x = calibrated("dyresnet18", (40, 36), 0.5, n=2)
    x = x.clone()
    x[0, :, 11, 7] = float("nan")
    ref, engs = engines(model, ["auto", "instance"])
    with torch.no_grad():
        want, want_stats = ref(x, return_stats=True)
        clean = model(x[1:])
        for engine in engs.values():
            for batch in (x, x[:1]):
                got, stats = engine(batch, return_stats=True)
                assert torch.allclose(got, want[: len(batch)], rtol=1e-4, atol=1e-5, equal_nan=True)
                assert torch.equal(stats["active"], want_stats["active"][: len(batch)])
            assert torch.allclose(engine(x)[1], clean[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch, size", [("dyresnet20", (32, 32)), ("dyresnet18", (64, 64))])
def test_batch_one_same_bits_for_any_team(arch, size):
    """At batch 1 the threads take chunks of each conv as they come free, so which thread computes
    which pixels changes from call to call; the pooled sums are added in a fixed order, so the
    logits and active sets do not change, whatever the number of threads."""
    model, x = calibrated(arch, size, 0.5, n=1)
    engine = compile(model, backend="cpu")
    threads = torch.get_num_threads()
    runs = []
    try:
        with torch.no_grad():
            for t in (2, 1, 2, 3, 2):
                torch.set_num_threads(t)
                runs.append(engine(x, return_stats=True))
    finally:
        torch.set_num_threads(threads)
    for logits, stats in runs[1:]:
        assert torch.equal(logits, runs[0][0])
        assert torch.equal(stats["active"], runs[0][1]["active"])


def test_batch_runs_each_instance_as_alone():
    """At batch > 1 the threads share out the instances (docs/DESIGN.md 7.7); every instance keeps
    its own maps, sums and active sets, so its logits and counts are the bits it gets alone,
    whatever the batch and the number of threads."""
    model, x = calibrated("dyresnet20", (16, 16), 0.5, n=11)
    engine = compile(model, backend="cpu")
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            alone = [engine(x[i : i + 1], return_stats=True) for i in range(len(x))]
            for t in (1, 2, 3):
                torch.set_num_threads(t)
                for n in (5, 11):
                    logits, stats = engine(x[:n], return_stats=True)
                    assert torch.equal(logits, torch.cat([a[0] for a in alone[:n]]))
                    assert torch.equal(stats["active"], torch.cat([a[1]["active"] for a in alone[:n]]))
    finally:
        torch.set_num_threads(threads)


def test_input_layouts():
    model, x = calibrated("dyresnet34", (40, 36), 0.5, n=2)
    ref, engs = engines(model, ["auto", "instance"])
    want = expected(model, ref, x)
    big = torch.zeros(2, 3, 80, 72)
    big[:, :, ::2, ::2] = x
    for engine in engs.values():
        check(engine, x.contiguous(memory_format=torch.channels_last), want)
        check(engine, x.transpose(2, 3).contiguous().transpose(2, 3), want)  # non-contiguous
        check(engine, big[:, :, ::2, ::2], want)                             # strided view


def test_auto_backend_prefers_cpu_and_save_load(tmp_path):
    model, x = calibrated("dyresnet20", (32, 32), 0.5, n=3)
    engine = compile(model)  # backend="auto"
    assert engine.backend.name == "cpu"
    path = tmp_path / "engine.pt"
    engine.save(str(path))
    from manidp.deploy import DynamicResNet
    loaded = DynamicResNet.load(str(path), backend="cpu")
    with torch.no_grad():
        assert torch.equal(loaded(x), engine(x))


def test_engine_under_torch_compile():
    model, x = calibrated("dyresnet20", (32, 32), 0.5, n=3)
    engine = compile(model, backend="cpu")
    with torch.no_grad():
        # Compiled, the engine runs one op per block (fake kernels); eagerly, the one-call network:
        # the same math, summed in another order.
        torch.testing.assert_close(torch.compile(engine, backend="aot_eager")(x), engine(x), rtol=1e-5, atol=1e-5)


def test_bad_mode_rejected():
    from manidp.deploy.cpu_backend import CpuBackend
    with pytest.raises(ValueError, match="mode must be one of"):
        CpuBackend(mode="fast")


def test_two_threads():
    """Parallel paths: rows split across threads inside a conv (batch 1), instances across threads."""
    model, x = calibrated("dyresnet18", (40, 36), 0.5, n=3)
    ref, engs = engines(model, ["auto", "instance", "library"])
    want1, want = expected(model, ref, x[:1]), expected(model, ref, x)
    torch.set_num_threads(2)
    try:
        for engine in engs.values():
            check(engine, x[:1], want1)
            check(engine, x, want)
    finally:
        torch.set_num_threads(1)


@pytest.mark.skipif(not HAVE_GCONV, reason="no gconv kernel on this CPU: the engine runs block by block")
def test_two_threads_batch_one_deep_with_closed_gates():
    """Batch 1 on 2 threads (one team through the whole network, each rank computing the gates)
    at ResNet-56 depth against the reference: stride-2 blocks, |A1| = 0 (conv2 does not run) in a
    stride-1 and a stride-2 block, |A2| = 0 (every channel is the shortcut alone) in another two."""
    model, x = calibrated("dyresnet56", (32, 32), 0.5, n=3)
    blocks = list(model.blocks())
    for gate in (blocks[2].gate1, blocks[9].gate1, blocks[13].gate2, blocks[18].gate2):  # 9, 18: stride 2
        gate.threshold.fill_(float("inf"))
    closed = [4, 18, 27, 37]
    # no gate value downstream of the closed ones within rounding (gate values are about 1, and
    # two engines' values differ by about 1e-6)
    assert threshold_margin(model, x) > 2e-5
    ref, engs = engines(model, ["auto"])
    want = [expected(model, ref, x[i:i + 1]) for i in range(len(x))]
    torch.set_num_threads(2)
    try:
        for i, want1 in enumerate(want):
            active = check(engs["auto"], x[i:i + 1], want1)["active"]
            assert (active[:, closed] == 0).all()
    finally:
        torch.set_num_threads(1)


@pytest.mark.skipif(not HAVE_GCONV, reason="no gconv kernel on this CPU: the engine runs block by block")
def test_auto_runs_the_whole_network_in_one_call():
    model, x = calibrated("dyresnet20", (32, 32), 0.5, n=2)
    engs = engines(model, ["auto", "instance"])[1]
    with torch.no_grad():
        logits, active = engs["auto"].backend.network(engs["auto"], x)
        assert engs["instance"].backend.network(engs["instance"], x) is None
    assert logits.shape == (2, 10) and active.shape == (2, 18) and active.dtype == torch.int32


@pytest.mark.skipif(not HAVE_GCONV, reason="no gconv kernel on this CPU: the engine runs block by block")
@pytest.mark.parametrize("threads", [1, 2])
def test_whole_network_reads_thresholds_changed_in_place(threads):
    """Thresholds set on the engine after compiling (as the bench's all-open copy does) take effect."""
    model, x = calibrated("dyresnet20", (32, 32), 0.5, n=3)
    engs = engines(model, ["auto", "instance"])[1]
    engine = engs["auto"]
    engine.blocks[1].gate1.threshold.fill_(float("inf"))
    engine.blocks[4].gate2.threshold.fill_(float("-inf"))
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            for batch in (x[:1], x):
                engine.backend.mode = "auto"
                got, stats = engine(batch, return_stats=True)
                engine.backend.mode = "instance"
                want, want_stats = engine(batch, return_stats=True)
                assert (stats["active"][:, 2] == 0).all()
                assert torch.equal(stats["active"], want_stats["active"])
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    finally:
        torch.set_num_threads(1)


@pytest.mark.skipif(not HAVE_GCONV, reason="no gconv kernel on this CPU: the engine runs block by block")
def test_whole_network_concurrent_callers_and_copies():
    """Calls from several Python threads at once (each takes its own workspace), and a deep copy."""
    import copy
    from concurrent.futures import ThreadPoolExecutor
    model, x = calibrated("dyresnet20", (32, 32), 0.5, n=4)
    engine = compile(model, backend="cpu")
    with torch.no_grad():
        want = [engine(x[i:i + 1]) for i in range(4)] + [engine(x)]
        with ThreadPoolExecutor(4) as pool:
            for _ in range(3):
                got = list(pool.map(lambda i: engine(x[i:i + 1]) if i < 4 else engine(x), range(5)))
                for g, w in zip(got, want):
                    assert torch.equal(g, w)
        assert torch.equal(copy.deepcopy(engine)(x), want[-1])


@pytest.mark.skipif(not HAVE_GCONV, reason="no gconv kernel on this CPU: the engine runs block by block")
def test_whole_network_rejects_bad_input():
    model, x = calibrated("dyresnet20", (32, 32), 0.5, n=2)
    engine = compile(model, backend="cpu")
    net = engine.backend._network
    with pytest.raises(RuntimeError, match=r"x must have shape \(N, Cin, H, W\)"):
        net.forward(torch.zeros(2, 4, 32, 32))
    with pytest.raises(RuntimeError, match="float32"):
        net.forward(torch.zeros(2, 3, 32, 32, dtype=torch.float64))


# Run in a child process: MANIDP_GCONV_ISA is read once per process.
_FORCED_ISA_CHECK = textwrap.dedent("""
    import sys
    import torch
    sys.path.insert(0, TESTS_DIR)
    from conftest import calibrated
    from manidp.deploy import compile
    torch.set_num_threads(1)
    for arch, size, seed in (("dyresnet20", (32, 32), 0), ("dyresnet18", (45, 39), 1)):
        model, x = calibrated(arch, size, 0.5, n=3, seed=seed)
        with torch.no_grad():
            want = compile(model, backend="reference")(x)
            got = compile(model, backend="cpu")(x)
            got1 = compile(model, backend="cpu")(x[:1])
        for g, w in ((got, want), (got1, want[:1])):
            err = float((g - w).abs().max() / w.abs().max())
            assert err < 1e-4, (arch, err)
    print(torch.ops.manidp.gconv_isa())
""").replace("TESTS_DIR", repr(os.path.dirname(os.path.abspath(__file__))))


def _run_with_isa(isa, script):
    env = dict(os.environ, MANIDP_GCONV_ISA=isa)
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("isa,allowed", [("avx512", {"avx512", "avx2", "none"}), ("avx2", {"avx2", "none"}),
                                         ("off", {"none"})])
def test_each_gconv_kernel_matches_reference(isa, allowed):
    """Every kernel this CPU runs (a wider one is never taken when a narrower one is asked for)."""
    r = _run_with_isa(isa, _FORCED_ISA_CHECK)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-1] in allowed


def test_gconv_isa_reported_and_bad_value_rejected():
    assert torch.ops.manidp.gconv_isa() in {"avx512", "avx2", "none"}
    r = _run_with_isa("sse", "import torch, manidp.deploy.ops; torch.ops.manidp.gconv_isa()")
    assert r.returncode != 0 and "MANIDP_GCONV_ISA must be auto, avx512, avx2 or off" in r.stderr


# Logits of the cpu engine on networks whose maps use every assembly register block (6, 5 and 4
# rows, the last from few active channels; 4 vectors on 32x32-derived maps, 3 on 7x7 plus a tail
# pixel; conv2's gathered columns; stride 2), written to the file named by argv[1].
_ASM_BLOCKS_LOGITS = textwrap.dedent("""
    import sys
    import torch
    sys.path.insert(0, TESTS_DIR)
    from conftest import calibrated
    from manidp.deploy import compile
    torch.set_num_threads(1)
    out = []
    cases = (("dyresnet20", (32, 32), 0, 0.5), ("dyresnet18", (28, 28), 1, 0.5), ("dyresnet18", (45, 39), 2, 0.5),
             ("dyresnet18", (28, 28), 3, 0.15))
    for arch, size, seed, macs in cases:
        model, x = calibrated(arch, size, macs, n=2, seed=seed)
        with torch.no_grad():
            engine = compile(model, backend="cpu")
            out += [engine(x), engine(x[:1])]
    torch.save(out, sys.argv[1])
    print(torch.ops.manidp.gconv_isa())
""").replace("TESTS_DIR", repr(os.path.dirname(os.path.abspath(__file__))))


def test_assembly_register_blocks_equal_the_intrinsics_blocks(tmp_path):
    """MANIDP_GCONV_ASM=0 (intrinsics) and the default (assembly blocks) give the same bits."""
    runs = {}
    for flag in ("0", "1"):
        path = str(tmp_path / f"asm{flag}.pt")
        env = dict(os.environ, MANIDP_GCONV_ASM=flag)
        r = subprocess.run([sys.executable, "-c", _ASM_BLOCKS_LOGITS, path], env=env, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        if r.stdout.split()[-1] != "avx512":
            pytest.skip("the assembly register blocks are AVX-512 only; this CPU runs " + r.stdout.split()[-1])
        runs[flag] = torch.load(path)
    for a, b in zip(runs["0"], runs["1"]):
        assert torch.equal(a, b)


def test_generated_assembly_is_up_to_date():
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc",
                          "gen_gconv_avx512_asm.py")
    r = subprocess.run([sys.executable, script, "--check"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
