"""The static-shape decoding step (`decoder.py`): eagerly it equals the reference step; compiled by
AOTInductor it gives the eager step's logits and greedy tokens, for one row, a left-padded batch, a
server's changing batch, an attention window that drops old keys (the same program: the window is an
argument), another checkpoint of the same shape (the weights are arguments), and an MoE model in int8
compiled in the background (one program whatever the routing)."""

import contextlib
import json
import shutil
import subprocess
import sys
import time

import pytest
import torch

from sakimi_next.decoder import CompiledDecoder, layer_views, step_hidden, window_tensor
from sakimi_next.generate import SamplingSettings, decode_one_token, generate, prefill
from sakimi_next.model import Qwen3NextForCausalLM
from sakimi_next.moe import SparseMoeBlock
from sakimi_next.quantize import quantize_int8

from .helpers import small_config, train_briefly
from .serve_support import running

needs_compiler = pytest.mark.skipif(not shutil.which("g++"), reason="AOTInductor on a CPU needs a C++ compiler")
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)


def trained(seed: int, **overrides) -> Qwen3NextForCausalLM:
    torch.manual_seed(seed)
    m = Qwen3NextForCausalLM(small_config(**overrides))
    train_briefly(m, m.config.vocab_size, steps=3, seed=seed)
    with torch.no_grad():
        for p in m.parameters():  # sharper, less uniform logits
            if p.ndim >= 2:
                p.mul_(3.0)
    return m.eval()


def padded_batch(model, seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, model.config.vocab_size, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    return ids, mask


@torch.inference_mode()
def compare_steps(model, decode, steps: int = 12, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Prefill a left-padded batch into two caches; step one eagerly, the other with `decode`, feeding
    both the eager step's choices; the logits must agree at every step."""
    ids, mask = padded_batch(model)
    caches = [model.new_cache(2, capacity=12) for _ in range(2)]  # small: the decoder must grow it
    token = prefill(model, ids, mask, caches[0]).argmax(-1)
    prefill(model, ids, mask, caches[1])
    for _ in range(steps):
        eager, other = decode_one_token(model, token, caches[0]), decode(model, token, caches[1])
        torch.testing.assert_close(other, eager, rtol=rtol, atol=atol)
        token = eager.argmax(-1)
    assert (caches[1].length, caches[1].dropped) == (caches[0].length, caches[0].dropped)


@contextlib.contextmanager
def attention_window(model, window: int | None):
    """Within: the caches the model makes have this attention window (`set_attention_window`)."""
    model.set_attention_window(window)
    try:
        yield
    finally:
        model.set_attention_window(None)


@pytest.mark.parametrize("window", [None, 5], ids=["all-keys", "window-5"])
def test_static_step_equals_the_reference_step(window):
    """The fixed-capacity step run eagerly (no compiler): same logits, same cache contents; with a
    window, the old keys dropped as the eager step drops them."""
    model = trained(0)

    @torch.inference_mode()
    def static(model, token, cache):
        cache.reserve(1)
        length = torch.tensor(cache.length)
        hidden = step_hidden(model, token[:, None], cache.next_position, length, window_tensor(cache),
                             cache.key_mask, layer_views(cache))
        cache.next_position += 1
        cache.length += 1
        return model.step_logits(hidden)[:, 0]

    with attention_window(model, window):
        compare_steps(model, static, steps=20)
        prompt = torch.randint(1, model.config.vocab_size, (5,)).tolist()
        assert generate(model, [prompt], 30, decode=static) == generate(model, [prompt], 30)


def test_reserve_gives_every_attention_layer_and_the_mask_one_capacity():
    model = trained(0)
    cache = model.new_cache(2, capacity=4)
    with torch.inference_mode():
        model(torch.ones(2, 3, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]), cache=cache)
        cache.reserve(2)  # 3 + 2 > 4: grows
    full = [l for l in cache.layers if hasattr(l, "keys")]
    assert cache.capacity >= 5 and all(l.keys.shape[2] == cache.capacity for l in full)
    assert cache.key_mask[:, :3].tolist() == [[False, True, True], [True, True, True]]
    assert cache.key_mask[:, 3:].all()  # from `length` on, True: the step's mask cuts at the new token
    capacity = cache.capacity
    cache.reserve(1)
    assert cache.capacity == capacity  # room enough: nothing moves


def test_reserve_in_a_full_windowed_cache_drops_as_record_does():
    model = trained(0)
    with attention_window(model, 3):
        caches = [model.new_cache(1, capacity=4) for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            model(torch.ones(1, 4, dtype=torch.long), cache=cache)
        caches[0].reserve(1)
        caches[1].record(None, 1)
    for cache in caches:  # the 2 keys the next query still sees moved to the front, room for as much again
        assert (cache.length, cache.dropped, cache.capacity) == (2, 2, 8)
    assert caches[0].key_mask[:, 2:].all()


def test_moe_decoding_step_equals_the_routed_forward():
    """`SparseMoeBlock.step` (each row's chosen experts, no loop over all experts) = `forward`."""
    torch.manual_seed(0)
    block = SparseMoeBlock(small_config(**MOE))
    block.reset_parameters(0.5)
    x = torch.randn(3, 2, 64)
    with torch.inference_mode():
        ref = block(x)[0]
        torch.testing.assert_close(block.step(x), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    return tmp_path_factory.mktemp("programs")


@pytest.fixture(scope="module")
def dense(programs):
    """A dense model and its compiled decoder (its program for one sequence compiled here)."""
    model = trained(0)
    decoder = CompiledDecoder(model, directory=programs)
    decoder.program(1)
    return model, decoder


@pytest.mark.slow
@needs_compiler
def test_compiled_step_equals_eager(dense):
    model, decoder = dense
    compare_steps(model, decoder)
    ids, mask = padded_batch(model)
    prompts = [ids[0, 4:].tolist(), ids[1].tolist()]
    assert generate(model, prompts, 40, decode=decoder) == generate(model, prompts, 40)  # the cache grows
    assert generate(model, prompts[:1], 20, decode=decoder) == generate(model, prompts[:1], 20)
    # two programs: one sequence (matrix-vector products), and any other batch
    assert decoder.compiled == 2 and len(list(decoder.directory.glob("*.pt2"))) == 2
    assert set(decoder.programs) == {1, None} and decoder.program_batch(7) is None


@pytest.mark.slow
@needs_compiler
def test_compiled_step_with_an_attention_window_equals_eager(dense):
    """The window is the program's argument: the same program, old keys dropped as the eager step
    drops them, the same logits."""
    model, decoder = dense
    compiled = decoder.compiled
    with attention_window(model, 5):
        compare_steps(model, decoder, steps=24)
        prompt = torch.randint(1, model.config.vocab_size, (5,)).tolist()
        assert generate(model, [prompt], 40, decode=decoder) == generate(model, [prompt], 40)
    assert decoder.compiled == compiled  # nothing compiled again


@pytest.mark.slow
@needs_compiler
def test_the_program_serves_another_checkpoint_of_the_same_shape(dense, programs):
    _, first = dense
    other = trained(7)
    decoder = CompiledDecoder(other, directory=programs)
    compare_steps(other, decoder)
    assert decoder.compiled == 0 and decoder.load_seconds < first.compile_seconds


@pytest.mark.slow
@needs_compiler
def test_a_program_of_several_tokens_a_step_equals_the_eager_pass(dense, programs):
    """A speculative verification pass compiled (one sequence, 3 tokens a step, so its products of 3 rows
    are traced as reductions): the eager pass's logits for every position, as the cache grows."""
    model, _ = dense
    decoder = CompiledDecoder(model, tokens_per_step=3, directory=programs)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(1, model.config.vocab_size, (1, 6), generator=gen)
    caches = [model.new_cache(1, capacity=8) for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            prefill(model, ids, None, cache)
        for _ in range(4):
            tokens = torch.randint(1, model.config.vocab_size, (1, 3), generator=gen)
            eager = model.step_logits(model.decode_hidden(tokens, caches[0]))
            torch.testing.assert_close(decoder(model, tokens.view(-1), caches[1]), eager, rtol=1e-5, atol=1e-5)
    assert caches[1].length == caches[0].length == 6 + 4 * 3 and set(decoder.programs) == {1}


@pytest.mark.slow
@needs_compiler
def test_a_server_makes_both_programs_of_a_dense_model_before_it_serves(dense, programs, monkeypatch):
    """`--mode serve --compile`: the program for one client and the one for any other batch are both
    ready (compiled or found on disk) before the server listens; `generate --compile` makes only the
    one it runs."""
    from sakimi_next import decoder as decoder_module
    from sakimi_next.decoder import choose_decoder

    model, _ = dense
    monkeypatch.setattr(decoder_module, "cache_dir", lambda: programs)
    assert set(choose_decoder(model, "yes", 0, background=True).programs) == {1, None}
    assert set(choose_decoder(model, "yes", 10).programs) == {1}


@pytest.mark.slow
@needs_compiler
def test_engine_with_the_compiled_step(dense):
    """`--mode serve`: 8 concurrent greedy requests through the compiled step (a batch that grows and
    shrinks) get what each gets alone from the eager step."""
    from .test_serve_batch import prompts, run_engine

    model, decoder = dense
    greedy = SamplingSettings(temperature=0)
    ps = [[t % model.config.vocab_size for t in p] for p in prompts(8, seed=4)]
    reqs = [dict(prompt=p, max_tokens=6 + 3 * i, sampling=greedy) for i, p in enumerate(ps)]
    compiled = run_engine(model, reqs, max_concurrent=8, decode=decoder)
    for i, (p, events) in enumerate(zip(ps, compiled)):
        alone = generate(model, [p], 6 + 3 * i)[0]
        assert "".join(e.text for e in events) == "".join(f" {t}" for t in alone)


@pytest.mark.slow
@needs_compiler
def test_moe_int8_compiled_in_the_background(programs):
    """An MoE model in int8: the program is compiled in another process while the eager step decodes,
    then taken up; one program serves every routing; logits within bfloat16 rounding (the int8
    products' activations) of the eager int8 step."""
    model = trained(3, **MOE)
    quantize_int8(model)
    messages = []
    decoder = CompiledDecoder(model, directory=programs / "moe", on_compile=messages.append, background=True)
    ids = torch.randint(1, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        caches = [model.new_cache(1, capacity=8) for _ in range(2)]
        token = prefill(model, ids, None, caches[0]).argmax(-1)
        prefill(model, ids, None, caches[1])
        # not compiled yet: the eager step answers, exactly
        assert torch.equal(decoder(model, token, caches[0]), decode_one_token(model, token, caches[1]))
        deadline = time.monotonic() + 1200  # bounded: compiling takes minutes on a busy 2-core machine
        while not decoder.ready(1) and time.monotonic() < deadline:
            time.sleep(1)
    assert decoder.ready(1) and "background" in messages[0]
    routes = []
    hook = model.model.layers[0].mlp.gate.register_forward_hook(lambda m, a, out: routes.append(out[2].tolist()))
    try:
        compare_steps_one_row(model, decoder)
    finally:
        hook.remove()
    assert len({tuple(map(tuple, r)) for r in routes}) > 1  # the routing changed from step to step
    assert len(list((programs / "moe").glob("*.pt2"))) == 1
    weights = json.loads(decoder.path(1).with_suffix(".json").read_text())["weights"]
    assert any("experts._int8" in a for a in weights)  # the experts' int8 copy, not their float weights
    assert not any(a.endswith("experts.gate_up_proj") or a.endswith("experts.down_proj") for a in weights)


@pytest.mark.slow
@needs_compiler
def test_moe_compiled_step_equals_eager(programs):
    """A float MoE model's compiled step (each row's chosen experts gathered inside its products, the ids
    never read by the host): the eager step's logits for a left-padded batch of two, as the cache grows;
    the program multiplies by the experts' own float weights."""
    model = trained(4, **MOE)
    decoder = CompiledDecoder(model, directory=programs / "moe-fp32")
    compare_steps(model, decoder)
    assert set(decoder.programs) == {2}
    weights = json.loads(decoder.path(2).with_suffix(".json").read_text())["weights"]
    assert any(a.endswith("experts.gate_up_proj") for a in weights) and not any("_int8" in a for a in weights)


@contextlib.contextmanager
def router_margins(model):
    """A list that gets, for every routed step, the smallest gap in any layer between the k-th chosen
    expert's router logit and the best one left out."""
    margins = []

    def record(router, inputs, out):
        top = out[0].float().topk(router.top_k + 1, dim=-1).values
        margins.append(float((top[:, -2] - top[:, -1]).min()))
    hooks = [m.gate.register_forward_hook(record) for m in model.modules() if isinstance(m, SparseMoeBlock)]
    try:
        yield margins
    finally:
        for hook in hooks:
            hook.remove()


@torch.inference_mode()
def compare_steps_one_row(model, decode, steps: int = 12, near_tie: float = 0.05) -> None:
    """As `compare_steps` for one row of an int8 MoE model: logits within bfloat16 rounding, except at a
    step where the eager routing was a near tie (a gap under `near_tie` between the last chosen expert
    and the next), which the compiled step's own rounding may break the other way."""
    ids = torch.randint(1, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3))
    caches = [model.new_cache(1, capacity=8) for _ in range(2)]
    token = prefill(model, ids, None, caches[0]).argmax(-1)
    prefill(model, ids, None, caches[1])
    compared = 0
    with router_margins(model) as margins:
        for _ in range(steps):
            margins.clear()
            eager = decode_one_token(model, token, caches[0])
            other = decode(model, token, caches[1])
            if min(margins) >= near_tie:
                torch.testing.assert_close(other, eager, rtol=0.05, atol=0.05 * float(eager.abs().max()))
                compared += 1
            token = eager.argmax(-1)
    assert compared >= steps * 2 // 3


def test_a_background_compile_ends_with_the_process_that_asked_for_it(tmp_path):
    """A server killed mid-compile leaves no compiler behind (it would hold the cores for minutes)."""
    code = ("import sys, time; from pathlib import Path; from sakimi_next.config import Config; "
            "from sakimi_next.model import Qwen3NextForCausalLM; from sakimi_next.decoder import CompiledDecoder; "
            "d = CompiledDecoder(Qwen3NextForCausalLM(Config(**__import__('json').loads(sys.argv[1]))), "
            "directory=Path(sys.argv[2]), background=True); d.ready(1); "
            "print(next(iter(d.compiling.values())).pid, flush=True); time.sleep(600)")
    config = json.dumps(small_config().to_dict())
    parent = subprocess.Popen([sys.executable, "-c", code, config, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        compiler = int(parent.stdout.readline())
        assert running(compiler)
    finally:
        parent.kill()
        parent.wait()
    for _ in range(100):  # bounded: the compile's watchdog looks once a second
        if not running(compiler):
            break
        time.sleep(0.2)
    assert not running(compiler)
