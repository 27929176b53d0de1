"""Our kernels inside stock transformers models (kernels/transformers_hook.py): every Mamba-family model that
transformers 5 ships, and our Bamba export, give the same logits and greedy tokens with and without them."""

import math

import pytest
import torch
from tolerances import logit_scale, within

from distill.kernels.transformers_hook import LAYERS, ops_in_use, use_in_transformers

MAMBA2_OPS = {"mamba_chunk_scan_combined", "selective_state_update", "causal_conv1d_fn", "causal_conv1d_update"}
MAMBA1_OPS = {"selective_scan_fn", "selective_state_update", "causal_conv1d_fn", "causal_conv1d_update"}
# Both paths compute every op in fp32; they sum the same terms in other orders (transformers' segment sums vs our
# factored chunks at another chunk size). Each logit goes through <= 3 layers of sums of <= L * n * p ~ 1e4 terms,
# whose rounding is ~sqrt(1e4) * 6e-8 ~ 6e-6 of the summed magnitudes (random-walk estimate; measured 2.5-4.2e-7
# of the logits' scale in all 8 families); 1e-5 of it is far from any real difference (a wrong decay or gate: > 1e-2).
LOGIT_TOL = 1e-5
VOCAB, PROMPT, NEW_TOKENS = 128, 40, 8


def family_configs():
    """A tiny random config of each Mamba-family causal LM in transformers (2-3 layers, one attention where the
    family has attention), with chunk sizes below the prompt length so the chunked scan has several chunks."""
    from transformers import (
        BambaConfig,
        FalconH1Config,
        FalconMambaConfig,
        GraniteMoeHybridConfig,
        Mamba2Config,
        MambaConfig,
        NemotronHConfig,
        Zamba2Config,
    )

    attn = {"num_attention_heads": 4, "num_key_value_heads": 2}
    common = {"vocab_size": VOCAB, "hidden_size": 64, "tie_word_embeddings": False}
    return {
        "bamba": BambaConfig(**common, **attn, intermediate_size=96, num_hidden_layers=3, attn_layer_indices=[1],
                             mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=16,
                             mamba_chunk_size=16),
        "mamba2": Mamba2Config(**common, num_heads=8, head_dim=16, state_size=16, n_groups=2, num_hidden_layers=2,
                               chunk_size=16),
        "nemotron_h": NemotronHConfig(**common, **attn, head_dim=16, intermediate_size=96,
                                      layers_block_type=["mamba", "attention", "mlp"], mamba_num_heads=8,
                                      mamba_head_dim=16, n_groups=2, ssm_state_size=16, chunk_size=16),
        "granitemoehybrid": GraniteMoeHybridConfig(**common, **attn, intermediate_size=96, num_hidden_layers=3,
                                                   layer_types=["mamba", "attention", "mamba"], num_local_experts=0,
                                                   shared_intermediate_size=96, mamba_n_heads=8, mamba_d_head=16,
                                                   mamba_n_groups=2, mamba_d_state=16, mamba_chunk_size=16),
        "falcon_h1": FalconH1Config(**common, **attn, intermediate_size=96, num_hidden_layers=2, mamba_d_ssm=128,
                                    mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=16, mamba_chunk_size=16),
        "zamba2": Zamba2Config(**common, **attn, intermediate_size=96, num_hidden_layers=3,
                               layers_block_type=["mamba", "hybrid", "mamba"], n_mamba_heads=8, mamba_ngroups=2,
                               mamba_d_state=16, chunk_size=16, num_mem_blocks=1),
        "mamba": MambaConfig(**common, state_size=8, num_hidden_layers=2),
        "falcon_mamba": FalconMambaConfig(**common, state_size=8, num_hidden_layers=2),
    }


FAMILIES = ["bamba", "mamba2", "nemotron_h", "granitemoehybrid", "falcon_h1", "zamba2", "mamba", "falcon_mamba"]


def random_model(config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # stock inits leave some mixer weights at constants; perturb all so every op matters
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model


def check_same_logits_and_greedy(model, expected_ops):
    """Logits of a batch (one row left-padded) and greedy tokens (prefill + cached decode steps), stock vs ours."""
    ids = torch.randint(VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    greedy = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "output_scores": True,
              "return_dict_in_generate": True, "pad_token_id": 0}
    with torch.no_grad():
        stock_logits = model(ids, attention_mask=mask).logits
        stock = model.generate(ids, attention_mask=mask, **greedy)
        use_in_transformers(model)
        assert ops_in_use(model) == expected_ops  # fails loudly if transformers renames or drops a kernel layer
        ours_logits = model(ids, attention_mask=mask).logits
        ours = model.generate(ids, attention_mask=mask, **greedy)
        model.reset_kernels()
    assert not ops_in_use(model)
    scale = stock_logits.abs().max()
    assert (ours_logits - stock_logits).abs().max() <= LOGIT_TOL * scale
    # Identical tokens are guaranteed when every step's top-2 gap exceeds twice the logit bound; check that first,
    # so a near tie in a random model shows up as what it is.
    gaps = torch.stack(stock.scores).topk(2, dim=-1).values.diff(dim=-1).abs()
    assert gaps.min() > 2 * LOGIT_TOL * scale
    assert torch.equal(ours.sequences, stock.sequences)


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_model_same_logits_and_greedy_with_our_kernels(family):
    config = family_configs()[family]
    check_same_logits_and_greedy(random_model(config), MAMBA1_OPS if family in ("mamba", "falcon_mamba") else MAMBA2_OPS)


def test_bamba_export_same_logits_and_greedy_with_our_kernels(tiny_llama, tmp_path):
    """Our Bamba export of a (tiny, random) student, loaded as a stock BambaForCausalLM."""
    from test_export import make_hybrid
    from transformers import BambaForCausalLM

    from distill.export import write_bamba

    write_bamba(make_hybrid(tiny_llama, attention_layers=[1], chunk_size=16), tmp_path, "1GB")
    check_same_logits_and_greedy(BambaForCausalLM.from_pretrained(tmp_path).eval(), MAMBA2_OPS)


def test_packed_sequences_run_and_stay_apart():
    """With ours, seq_idx works on CPU (stock transformers refuses it there): a row of two packed documents gives
    each document's logits on its own."""
    model = random_model(family_configs()["mamba2"])
    ids = torch.randint(VOCAB, (1, 50), generator=torch.Generator().manual_seed(2))
    seq_idx = torch.tensor([[0] * 20 + [1] * 30], dtype=torch.int32)
    with torch.no_grad():
        with pytest.raises(ValueError, match="packed sequences"):
            model(ids, seq_idx=seq_idx)
        use_in_transformers(model)
        packed = model(ids, seq_idx=seq_idx).logits
        alone = torch.cat([model(ids[:, :20]).logits, model(ids[:, 20:]).logits], dim=1)
    # The same fp32 ops on the same documents; only the chunk grid differs (the second document starts inside a
    # chunk of the packed row), so the sums differ by rounding: see LOGIT_TOL.
    assert (packed - alone).abs().max() <= LOGIT_TOL * alone.abs().max()


def test_training_mode_and_gradients_keep_our_kernels():
    """model.train() re-kernelizes (transformers does on a mode change) and keeps ours; gradients match stock."""
    model = random_model(family_configs()["bamba"])
    ids = torch.randint(VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(3))

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    model.train()
    stock = grads()
    use_in_transformers(model)
    model.eval()
    model.train()
    assert ops_in_use(model) == MAMBA2_OPS
    ours = grads()
    model.reset_kernels()
    # fp32 backward through the same math (see LOGIT_TOL); each gradient also sums over the batch and positions,
    # whose rounding errors add as a random walk: sqrt(tokens) times LOGIT_TOL
    bound = LOGIT_TOL * math.sqrt(ids.numel())
    within(((ours - stock).norm() / stock.norm()).item(), bound)


def test_every_layer_signature_matches_transformers():
    """kernelize only accepts a layer whose forward has the parameters of the function it replaces; this checks
    ours against every model file now, so a transformers change fails here by name rather than at a user's load."""
    import importlib
    import inspect

    seen = set()
    for family in FAMILIES:
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        for value in vars(module).values():
            name = getattr(type(value), "kernel_layer_name", None)
            if name in LAYERS:
                seen.add(name)
                theirs = inspect.signature(type(value).forward).parameters.values()
                ours = inspect.signature(LAYERS[name].forward).parameters.values()
                assert [(p.name, p.kind) for p in ours] == [(p.name, p.kind) for p in theirs], (family, name)
    assert seen == set(LAYERS)


def test_distill_eval_and_speed_run_our_kernels_on_a_bamba_export(tmp_path, monkeypatch):
    """`distill eval` of our Bamba export runs our scan and scores it as the native student it came from; the speed
    benchmark measures a Bamba export with our kernels too."""
    import json

    from test_eval_cli import SENTENCES
    from test_eval_lm_eval import save_tiny_checkpoint
    from test_export import make_hybrid

    from distill.eval.cli import main as eval_main
    from distill.eval.speed import benchmark, load_with_our_kernels
    from distill.export import write_bamba
    from distill.kernels import dispatch

    monkeypatch.setenv("MAMBA_DISTILL_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(SENTENCES[i:] + SENTENCES[:i])}) + "\n" for i in range(4)) * 3)
    teacher, _ = save_tiny_checkpoint(tmp_path / "llama")
    student = make_hybrid(teacher, attention_layers=[1], chunk_size=16)
    student.save_pretrained(tmp_path / "native")
    write_bamba(student, tmp_path / "bamba", "1GB")
    calls = []
    scan = dispatch.ssd_chunked  # what the dispatcher runs on CPU, looked up at each call
    monkeypatch.setattr(dispatch, "ssd_chunked", lambda *a, **k: calls.append(1) or scan(*a, **k))
    perplexity = {}
    for name in ("native", "bamba"):
        out = tmp_path / f"report-{name}"
        args = ["--student", str(tmp_path / name), "--teacher", str(tmp_path / "llama"), "--data", str(data),
                "--max-length", "64", "--max-sequences", "4", "--out", str(out)]
        assert eval_main(args) == 0
        perplexity[name] = json.loads((out / "report.json").read_text())["student"]["perplexity"]
        assert calls, name  # both ran our scan
        calls.clear()
    # the same fp32 model in two layouts: the logits differ by LOGIT_TOL of their scale, each NLL by at most twice
    # that (log-softmax), and perplexity = exp(mean NLL) by as much, relative (to first order)
    bound = 2 * LOGIT_TOL * logit_scale(student)
    within(abs(perplexity["bamba"] / perplexity["native"] - 1), bound)
    rows = benchmark({"bamba": load_with_our_kernels(tmp_path / "bamba", "cpu")}, [24], [2], 2, 64, log=lambda _: None)
    assert calls and rows[0]["prefill_tok_s"] > 0 and rows[0]["ssm_state_bytes"] > 0
