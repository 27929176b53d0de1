"""GGUF export: the file read back with gguf's reader rebuilds our model, and a real llama.cpp runs it.

The llama.cpp tests need node-llama-cpp (installed by scripts/setup_llama_cpp.sh) and skip with that reason
where it is missing.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REFERENCE_STUDENT, clear_greedy, make_tiny_tokenizer, reordering_bound, tiny_llama_config

from distill import llama_cpp
from distill.errors import UserError
from distill.export_gguf import ssm_heads, tokenizer_from_gguf, tokenizer_from_hf, write_gguf
from distill.recipe import StudentConfig, load_recipe

needs_llama_cpp = pytest.mark.skipif(llama_cpp.unavailable() is not None, reason=str(llama_cpp.unavailable()))


def make_hybrid(teacher, mixer="mamba2", seed=0, sharpen=True, **student):
    """A hybrid whose mixer parameters are all perturbed (so every one matters).

    Random tiny models have logits of ~0.2 (near-uniform next-token distributions, where every top-1 is a near
    tie) and near-uniform attention (where a wrong RoPE layout would hardly show). `sharpen` scales the final
    norm by 40 (logits of ~10, clear top-1 choices) and q and k by 4 (attention that depends on position).
    """
    from distill.init import hybrid_from_teacher

    model = hybrid_from_teacher(
        teacher, StudentConfig(**{**REFERENCE_STUDENT, "mixer": mixer, **student}), seed=seed
    )
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".mamba." in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
            elif sharpen and name == "model.norm.weight":
                param.mul_(40)
            elif sharpen and name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(4)
    return model.eval()


MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a")]


def _tiny(tmp_path_factory, **student):
    """A tiny random 4-layer hybrid (attention in layers 1 and 2) with a byte-level BPE, saved."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_llama_config(vocab_size=262)).eval()
    model = make_hybrid(teacher, attention_layers=[1, 2], **student)
    folder = tmp_path_factory.mktemp("tiny") / "final"
    model.save_pretrained(folder)
    make_tiny_tokenizer(MERGES).save_pretrained(folder)
    fields = tokenizer_from_hf(folder, model.config, pre="gpt-2")
    return model, folder, fields


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_wide_state(tmp_path_factory):
    """The same with a Mamba-2 state 1.5 heads wide (head_dim 16, d_state 24)."""
    return _tiny(tmp_path_factory, mamba2_d_state=24)


def _prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, length), generator=generator).tolist()


# ----------------------------------------------------------------------------- read back with gguf


def rebuild(path, num_key_value_heads: int):
    """Our HybridForCausalLM from a granitehybrid GGUF alone: hyperparameters from its metadata, weights
    dequantized and mapped back (q/k rows un-permuted, x/B back to kv width, head copies dropped)."""
    import gguf

    from distill.modeling_hybrid import HybridConfig, HybridForCausalLM

    reader = gguf.GGUFReader(str(path))
    meta = {key: field.contents() for key, field in reader.fields.items()}
    arch = meta["general.architecture"]
    tensors = {
        t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        for t in reader.tensors
    }
    nh, hd = meta[f"{arch}.attention.head_count"][0], meta[f"{arch}.attention.key_length"]  # per layer
    n = meta[f"{arch}.ssm.state_size"]
    nkv, repeats = num_key_value_heads, nh // num_key_value_heads
    kinds = ["attention" if kv else "mamba2" for kv in meta[f"{arch}.attention.head_count_kv"]]
    assert all(kv in (0, nkv) for kv in meta[f"{arch}.attention.head_count_kv"])
    cfg = HybridConfig(
        vocab_size=meta[f"{arch}.vocab_size"],
        hidden_size=meta[f"{arch}.embedding_length"],
        intermediate_size=meta[f"{arch}.feed_forward_length"],
        num_hidden_layers=meta[f"{arch}.block_count"],
        num_attention_heads=nh,
        num_key_value_heads=nkv,
        head_dim=hd,
        rms_norm_eps=meta[f"{arch}.attention.layer_norm_rms_epsilon"],
        max_position_embeddings=meta[f"{arch}.context_length"],
        rope_parameters={"rope_type": "default", "rope_theta": meta[f"{arch}.rope.freq_base"]},
        tie_word_embeddings="output.weight" not in tensors,
        mixer_types=kinds,
        d_conv=meta[f"{arch}.ssm.conv_kernel"],
        mamba2_d_state=n,
    )
    heads, groups, d_inner = meta[f"{arch}.ssm.time_step_rank"], meta[f"{arch}.ssm.group_count"], nh * hd
    assert groups == nh and heads % nh == 0
    copies = heads // nh

    def unpair(weight, n):  # llama.cpp's adjacent RoPE pairs back to transformers' halves
        rows, cols = weight.shape
        return weight.reshape(n, rows // n // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

    def first_copy(block, width=hd):  # `copies` equal blocks per head -> one, checking they are equal
        blocks = block.reshape(nh, copies, width, *block.shape[1:])
        assert (blocks == blocks[:, :1]).all(), "the copies of a head differ"
        return blocks[:, 0].reshape(nh * width, *block.shape[1:])

    def kv_width(block, width=hd):  # one block per head -> one per kv group, checking the GQA repeat
        blocks = block.reshape(nkv, repeats, width, *block.shape[1:])
        assert (blocks == blocks[:, :1]).all(), "x or B differs within a kv group"
        return blocks[:, 0].reshape(nkv * width, *block.shape[1:])

    def xbc(rows):
        x, b, c = rows.split([heads * hd, nh * n, nh * n])
        return torch.cat([kv_width(first_copy(x)), kv_width(b, n), c])

    state = {
        "model.embed_tokens.weight": tensors["token_embd.weight"],
        "model.norm.weight": tensors["output_norm.weight"],
    }
    state["lm_head.weight"] = tensors.get("output.weight", tensors["token_embd.weight"])
    for i, kind in enumerate(kinds):
        blk, ours = f"blk.{i}.", f"model.layers.{i}."
        state[ours + "input_layernorm.weight"] = tensors[blk + "attn_norm.weight"]
        state[ours + "post_attention_layernorm.weight"] = tensors[blk + "ffn_norm.weight"]
        for name in ("gate", "up", "down"):
            state[ours + f"mlp.{name}_proj.weight"] = tensors[blk + f"ffn_{name}.weight"]
        if kind == "attention":
            state[ours + "self_attn.q_proj.weight"] = unpair(tensors[blk + "attn_q.weight"], nh)
            state[ours + "self_attn.k_proj.weight"] = unpair(tensors[blk + "attn_k.weight"], nkv)
            state[ours + "self_attn.v_proj.weight"] = tensors[blk + "attn_v.weight"]
            state[ours + "self_attn.o_proj.weight"] = tensors[blk + "attn_output.weight"]
            continue
        z, xbc_rows, dt = tensors[blk + "ssm_in.weight"].split([heads * hd, heads * hd + 2 * nh * n, heads])
        out = tensors[blk + "ssm_out.weight"].reshape(-1, nh, copies, hd)
        assert not out[:, :, 1:].any(), "out_proj reads a head's copies"
        mixer = ours + "mamba."
        state[mixer + "in_proj.weight"] = torch.cat([first_copy(z), xbc(xbc_rows), first_copy(dt, 1)])
        state[mixer + "conv1d.weight"] = xbc(tensors[blk + "ssm_conv1d.weight"]).unsqueeze(1)
        state[mixer + "conv1d.bias"] = xbc(tensors[blk + "ssm_conv1d.bias"])
        state[mixer + "dt_bias"] = first_copy(tensors[blk + "ssm_dt.bias"], 1)
        state[mixer + "A_log"] = torch.log(-first_copy(tensors[blk + "ssm_a"].reshape(-1), 1))
        state[mixer + "D"] = first_copy(tensors[blk + "ssm_d"].reshape(-1), 1)
        state[mixer + "norm.weight"] = first_copy(tensors[blk + "ssm_norm.weight"].reshape(-1))
        state[mixer + "out_proj.weight"] = out[:, :, 0].reshape(-1, d_inner)
    model = HybridForCausalLM(cfg).eval()
    model.load_state_dict(state, strict=True)
    return model


@pytest.mark.parametrize("hybrid", ["tiny", "tiny_wide_state"])
def test_f32_gguf_read_back_rebuilds_the_model(hybrid, tmp_path, request):
    """f32 stores every weight exactly except A, stored as -exp(A_log) (log(exp(a)) moves A_log by an ulp),
    and the head copies are exact; so the rebuilt model's logits stay within the reordering bound."""
    model, _, fields = request.getfixturevalue(hybrid)
    path = write_gguf(model, tmp_path / "m.gguf", "f32", fields)
    rebuilt = rebuild(path, model.config.num_key_value_heads)
    assert rebuilt.config.mixer_types == model.config.mixer_types
    assert rebuilt.config.mamba2_d_state == model.config.mamba2_d_state
    assert ssm_heads(model.config) * model.config.head_dim == 2 * model.config.hidden_size
    ids = torch.tensor(_prompts(2, 24, model.config.vocab_size))
    with torch.no_grad():
        expected, got = model(ids).logits, rebuilt(ids).logits
    assert (expected - got).abs().max() <= reordering_bound(model.config, torch.float32, expected.abs().max())


def test_outtypes_store_matrices_in_their_type(tiny, tmp_path):
    import gguf

    model, _, fields = tiny
    for outtype, kind in (("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")):
        reader = gguf.GGUFReader(str(write_gguf(model, tmp_path / f"{outtype}.gguf", outtype, fields)))
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert (
            types["blk.0.ssm_in.weight"] == types["blk.1.attn_q.weight"] == types["token_embd.weight"] == kind
        )
        assert (
            types["blk.0.ssm_conv1d.weight"]
            == types["blk.0.ssm_a"]
            == types["blk.0.attn_norm.weight"]
            == "F32"
        )


def test_cli_writes_the_file_and_refuses_in_one_line(tiny, tmp_path, capsys, monkeypatch):
    from distill import export_gguf as module
    from distill.cli import main

    _, folder, _ = tiny
    assert main(["export", str(folder), "--format", "gguf", "--out", str(tmp_path / "a")]) == 2
    assert (
        "tokenizers, not this llama one" in capsys.readouterr().err
    )  # a byte tokenizer llama.cpp cannot name
    monkeypatch.setitem(module._PRE_TOKENIZERS, ("llama", 262), "gpt-2")
    assert (
        main(["export", str(folder), "--format", "gguf", "--out", str(tmp_path / "a"), "--outtype", "q4"])
        == 2
    )
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --outtype 'q4' is not supported; use one of f32, f16, bf16, q8_0"
    ]
    assert (
        main(["export", str(folder), "--format", "gguf", "--out", str(tmp_path / "a"), "--outtype", "f16"])
        == 0
    )
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["model-f16.gguf"]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    assert main(["export", str(folder), "--format", "gguf", "--out", str(tmp_path / "b")]) == 2
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("student", "message"),
    [
        ({"mixer": "mamba1"}, "Mamba-1 mixers"),
    ],
)
def test_what_llama_cpp_lacks_is_refused_in_one_line(tiny_llama, tmp_path, student, message):
    from distill.init import hybrid_from_teacher

    model = hybrid_from_teacher(tiny_llama, StudentConfig(**{**REFERENCE_STUDENT, **student}), seed=0)
    with pytest.raises(UserError, match=message) as err:
        write_gguf(model, tmp_path / "m.gguf", "f32", [])
    assert "\n" not in str(err.value) and "--format native" in str(err.value)
    assert not (tmp_path / "m.gguf").exists()


# ----------------------------------------------------------------------------- a real llama.cpp


def _llama_cpp_logprobs(answer, top: int) -> list[list[tuple[int, float]]]:
    return [[(token, float(np.log(p))) for token, p in position[:top]] for position in answer["positions"]]


@needs_llama_cpp
@pytest.mark.parametrize("hybrid", ["tiny", "tiny_wide_state"])
def test_llama_cpp_runs_the_f32_export_like_transformers(hybrid, tmp_path, request):
    """Next-token distributions at every position and greedy continuations on 4 prompts, llama.cpp (f32
    weights, f32 KV cache) against ours. llama.cpp computes the same sums in another order (and the SSM by its
    sequential scan, not our chunked one), so each log-probability may differ by twice the reordering bound;
    greedy picks are compared only where they win by more than that (`clear_greedy`)."""
    model, _, fields = request.getfixturevalue(hybrid)
    path = write_gguf(model, tmp_path / "m.gguf", "f32", fields)
    prompts = _prompts(4, 20, model.config.vocab_size, seed=3)
    jobs = [{"kind": "evaluate", "tokens": p, "top": 5} for p in prompts]
    jobs += [{"kind": "greedy", "tokens": p, "steps": 12} for p in prompts]
    answers = llama_cpp.run(path, jobs, kv_type="F32")["answers"]
    for prompt, evaluated, greedy in zip(prompts, answers[:4], answers[4:]):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            logits = model(ids).logits[0]
        logprobs = logits.log_softmax(-1)
        bound = 2 * reordering_bound(model.config, torch.float32, logits.abs().max())
        for position, top in enumerate(_llama_cpp_logprobs(evaluated, 5)):
            best, second = logprobs[position].topk(2).values.tolist()
            if best - second > 2 * bound:  # within the bound both ways, a wider gap cannot flip the top pick
                assert top[0][0] == logprobs[position].argmax().item(), position
            for token, logprob in top:
                assert abs(logprob - logprobs[position, token].item()) <= bound, (position, token)
        expected = clear_greedy(model, ids, max_new_tokens=12)[0, len(prompt) :].tolist()
        assert greedy["tokens"] == expected


@needs_llama_cpp
def test_llama_cpp_q8_0_top1_agreement(tiny, tmp_path):
    """q8_0 rounds every matrix to 8 bits per weight, so only a measured rate is meaningful: top-1 agreement
    with our fp32 model at every position of 8 prompts. This tiny random model (64-wide random rows,
    sharpened q/k) measures 0.965; a mis-laid quantized block would scramble its weights and fall towards
    chance (1/vocab). The bound, 0.9, leaves another CPU's llama.cpp kernels (other SIMD paths, other sums)
    room to break a few more near ties (each is 1/256) and stays far above chance. The real model's rate is
    measured by scripts/gguf_agreement.py (docs/llama-cpp.md)."""
    model, _, fields = tiny
    path = write_gguf(model, tmp_path / "m.gguf", "q8_0", fields)
    prompts = _prompts(8, 32, model.config.vocab_size, seed=4)
    answers = llama_cpp.run(path, [{"kind": "evaluate", "tokens": p, "top": 1} for p in prompts])["answers"]
    with torch.no_grad():
        expected = model(torch.tensor(prompts)).logits.argmax(-1)
    got = torch.tensor([[position[0][0] for position in a["positions"]] for a in answers])
    assert (got == expected).float().mean().item() >= 0.9


@needs_llama_cpp
def test_llama_cpp_tokenizes_like_the_teacher(tiny, tmp_path):
    model, _, fields = tiny
    path = write_gguf(model, tmp_path / "m.gguf", "f32", fields)
    texts = ["Hello, world!", "  two spaces and\ttabs\n", "naïve café ☕"]
    answers = llama_cpp.run(path, [{"kind": "tokenize", "text": t} for t in texts])["answers"]
    tokenizer = make_tiny_tokenizer(MERGES)
    assert [a["tokens"] for a in answers] == [tokenizer(t)["input_ids"] for t in texts]


# ----------------------------------------------------------------------------- the real teacher


@pytest.mark.slow
def test_builtin_teacher_tokenizer_fields_from_its_gguf_and_its_hf_folder_agree(smollm2):
    """The two tokenizer sources give llama.cpp the same vocabulary, merges, ids and chat template."""
    from distill.assets import asset_path
    from distill.teacher import builtin_teacher_dir

    teacher, _ = smollm2
    from_gguf = {key: value for key, value, *_ in tokenizer_from_gguf(asset_path("smollm2"))}
    cfg = make_hybrid(teacher, sharpen=False, attention_fraction=0.5).config
    from_hf = {key: value for key, value, *_ in tokenizer_from_hf(builtin_teacher_dir(), cfg)}
    for key in (
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.chat_template",
    ):
        assert from_hf[key] == from_gguf[key], key


def chat_prompts(tokenizer, questions: list[str]) -> list[list[int]]:
    """Each question as a one-turn chat, through the tokenizer's template up to the assistant header."""
    return [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, return_dict=True
            )["input_ids"]
        )
        for q in questions
    ]


def clear_greedy_prefix(model, ids: torch.Tensor, steps: int) -> list[int]:
    """Our greedy continuation up to its first pick that does not win by twice the reordering bound: any other
    correct computation of the same logits must pick these tokens (past a near tie it may rightly diverge)."""
    out = model.generate(
        ids, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    logits = torch.stack(out.logits)[:, 0].float()
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * reordering_bound(model.config, torch.float32, logits.abs().max())
    length = int(clear.int().cumprod(0).sum())
    return out.sequences[0, ids.shape[1] : ids.shape[1] + length].tolist()


def greedy_like_ours(model, gguf: Path, prompts: list[list[int]], steps: int) -> int:
    """Assert that llama.cpp's greedy continuations of `gguf` (f32 attention cache) equal ours up to our first
    near tie (`clear_greedy_prefix`); returns how many tokens that compared."""
    jobs = [{"kind": "greedy", "tokens": p, "steps": steps} for p in prompts]
    answers = llama_cpp.run(gguf, jobs, kv_type="F32")
    compared = 0
    for prompt, answer in zip(prompts, answers["answers"]):
        expected = clear_greedy_prefix(model, torch.tensor([prompt]), steps=steps)
        assert answer["tokens"][: len(expected)] == expected
        compared += len(expected)
    return compared


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_runs_a_smollm2_hybrid_like_transformers(smollm2, tmp_path):
    """The real teacher's 50% hybrid (mixers initialised from its attention), f32 with an f32 attention cache,
    on chat prompts: greedy continuations equal ours up to the first near tie, and top-1 equals ours at every
    prompt position where our pick is clear. q8_0 is measured, on the trained demo student, by
    scripts/gguf_agreement.py and the demo-student test below (docs/llama-cpp.md): q8_0's weight rounding
    alone moves about 2% of the top-1 picks, and llama.cpp also rounds activations to 8 bits in every matrix
    product."""
    from distill.assets import asset_path
    from distill.init import hybrid_from_teacher

    teacher, tokenizer = smollm2
    student = StudentConfig(**{**REFERENCE_STUDENT, "mixer": "mamba2", "attention_fraction": 0.5})
    model = hybrid_from_teacher(teacher, student, seed=0).eval()
    fields = tokenizer_from_gguf(asset_path("smollm2"))
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "Name three primes."]
    prompts = chat_prompts(tokenizer, questions)
    f32 = write_gguf(model, tmp_path / "f32.gguf", "f32", fields)
    greedy_like_ours(model, f32, prompts, steps=16)
    jobs = [{"kind": "evaluate", "tokens": p, "top": 1} for p in prompts]
    answers = llama_cpp.run(f32, jobs, kv_type="F32")
    clear_positions = 0
    for prompt, answer in zip(prompts, answers["answers"]):
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0]
        top2 = logits.topk(2, dim=-1).values
        bound = reordering_bound(model.config, torch.float32, logits.abs().max())
        clear = (top2[:, 0] - top2[:, 1]) > 2 * bound
        got = torch.tensor([position[0][0] for position in answer["positions"]])
        assert torch.equal(got[clear], logits.argmax(-1)[clear])
        clear_positions += int(clear.sum())
    assert clear_positions >= 10


# the demo recipe's output folder (its `output_dir`), or another run of it
DEMO_RUN = Path(
    os.environ.get("DISTILL_DEMO_RUN", Path(__file__).parents[1] / "outputs" / "smollm2-135m-hybrid50-mamba2")
)


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.skipif(
    not (DEMO_RUN / "final").is_dir(),
    reason=f"no trained demo student in {DEMO_RUN}/final: run the demo, or set DISTILL_DEMO_RUN to a run",
)
def test_llama_cpp_runs_the_demo_student_like_transformers(tmp_path):
    """The trained demo student through the CLI's export: in f32, llama.cpp's greedy continuations of chat
    prompts equal ours up to the first near tie; in q8_0 (llama.cpp's f16 cache), top-1 agreement at every
    prompt position is measured by scripts/gguf_agreement.py (docs/llama-cpp.md) and here only held above 0.9,
    far above what a mis-laid block or a wrong head order gives (chance, ~0)."""
    from distill.checkpoints import load_hybrid
    from distill.export_gguf import export_gguf
    from distill.teacher import load_teacher

    model = load_hybrid(DEMO_RUN / "final").float().eval()
    _, tokenizer = load_teacher(load_recipe(DEMO_RUN / "recipe.yaml").teacher, dtype=torch.float32)
    questions = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "Name three primes.",
        "How do I boil an egg?",
    ]
    prompts = chat_prompts(tokenizer, questions)
    f32 = export_gguf(DEMO_RUN / "final", tmp_path / "f32", "f32")
    clear_tokens = greedy_like_ours(model, f32, prompts, steps=24)
    assert clear_tokens >= 8  # the demo student answers briefly and stops at <|im_end|>: 10 decided tokens
    q8_0 = export_gguf(DEMO_RUN / "final", tmp_path / "q8_0", "q8_0")
    answers = llama_cpp.run(q8_0, [{"kind": "evaluate", "tokens": p, "top": 1} for p in prompts])["answers"]
    agree = total = 0
    for prompt, answer in zip(prompts, answers):
        with torch.no_grad():
            expected = model(torch.tensor([prompt])).logits[0].argmax(-1)
        got = torch.tensor([position[0][0] for position in answer["positions"]])
        agree += int((got == expected).sum())
        total += len(prompt)
    assert agree / total >= 0.9
