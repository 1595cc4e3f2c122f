"""cb (rr), cb_lat and lat against independent transcriptions of their reference code.

Each test builds a tiny random-init model, a trained copy (the base plus small noise, so the
representation losses are not trivially zero) and the frozen base, then computes one step's loss
twice: with the package (``methods.build_method``) and with a transcription, written here with
plain torch and forward hooks on the model's own modules (nothing from ``unlearning/losses.py``,
``adversary.py`` or ``hooks.py``), of:

- GraySwanAI/circuit-breakers ``src/lorra_circuit_breaker.py`` ``compute_loss`` (copy: EleutherAI/
  unlearn ``unlearn/reference/grey_swan_circuit_breaker/lorra.py``);
- EleutherAI/unlearn ``unlearn/reference/cas/unlearning.py`` ``RRTrainer.compute_loss``,
  ``CombinedAdversary``, ``gradient_descent_attack`` (deep ignorance's rr-lat);
- aengusl/latent-adversarial-training ``latent_at/laa/attacks.py`` ``GDAdversary``,
  ``latent_at/lat_methods.py`` ``projected_gradient_descent``, ``latent_at/lat_helpers.py``
  ``compute_toward_away_loss`` / ``do_defense_step``, ``latent_at/utils.py`` ``log_1_minus_p_loss``.

The references index ``output_hidden_states``: entry ``l`` is the output of block ``l - 1``; the
transcriptions take block outputs from hooks (their raw last block output, where HF's last entry
is after the final norm) and no padding (the references' ``nanmean`` counts padded positions;
the package averages over real tokens: the same numbers without padding).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from unlearn_lens.architectures import ArchitectureAdapter
from unlearn_lens.core.errors import UserError
from unlearn_lens.testing import make_tiny_model
from unlearn_lens.unlearning.config import UnlearnConfig
from unlearn_lens.unlearning.methods import MethodContext, Reference, build_method, fit_attack, forward
from unlearn_lens.unlearning.presets import PRESETS, Preset, scale_layers

N_LAYERS = 4


# --- set-up ---------------------------------------------------------------------------------

def resolve(preset: Preset, method: str, n_layers: int, **overrides) -> UnlearnConfig:
    """An UnlearnConfig from a preset (its ``depth_scaled`` layers scaled by depth), then ``overrides``."""
    values = dict(preset.values)
    for key in preset.depth_scaled:
        values[key] = scale_layers(values[key], n_layers)
    values.update(overrides)
    cfg = UnlearnConfig("m", "d", "o", method, **values)
    cfg.validate()
    cfg.resolve_layers(n_layers)
    return cfg


def tiny(n_layers=N_LAYERS, noise=0.05):
    """(trained, frozen): a tiny Llama and a copy of it moved by seeded noise (the 'trained' one)."""
    frozen, _ = make_tiny_model("llama", seed=0, layers=n_layers)
    frozen.requires_grad_(False)
    trained = copy.deepcopy(frozen)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * noise)
    trained.requires_grad_(True)
    return trained, frozen


def batch(seed, size=2, seq=10, vocab=300):
    ids = torch.randint(5, vocab, (size, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def package_method(cfg, trained, frozen, total_steps):
    reference = Reference(frozen, ArchitectureAdapter(frozen)) if frozen is not None else None
    ctx = MethodContext(cfg, trained, ArchitectureAdapter(trained), total_steps, reference, plain_model=trained,
                        hidden_size=trained.config.hidden_size)
    return build_method(ctx)


def block_outputs(model, ids, extra_hooks=()):
    """Every block's output (hooks on ``model.model.layers``), the logits; ``extra_hooks`` are
    (module, hook) pairs registered for the pass."""
    outs = {}

    def grab(i):
        def hook(module, args, output):
            outs[i] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [layer.register_forward_hook(grab(i)) for i, layer in enumerate(model.model.layers)]
    handles += [module.register_forward_hook(hook) for module, hook in extra_hooks]
    try:
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    finally:
        for h in handles:
            h.remove()
    return [outs[i] for i in range(len(outs))], logits


def reference_rr_terms(lora_cb, orig_cb, lora_retain, orig_retain, cb_mask, retain_mask):
    """The reference's two terms from stacked hidden states (GraySwan and deep ignorance alike)."""
    layers_cb_mask = cb_mask.repeat(len(lora_cb), 1, 1).unsqueeze(-1)
    layers_retain_mask = retain_mask.repeat(len(lora_retain), 1, 1).unsqueeze(-1)
    lora_retain_hidden = torch.stack(lora_retain) * layers_retain_mask
    orig_retain_hidden = torch.stack(orig_retain) * layers_retain_mask
    retain_loss = torch.norm(lora_retain_hidden - orig_retain_hidden, dim=-1, p=2, dtype=torch.float).nanmean()
    lora_cb_hidden, cb_hidden = torch.stack(lora_cb), torch.stack(orig_cb)
    normalized_lora = lora_cb_hidden / torch.norm(lora_cb_hidden, dim=-1, keepdim=True, dtype=torch.float)
    normalized_orig = cb_hidden / torch.norm(cb_hidden, dim=-1, keepdim=True, dtype=torch.float)
    inner_product = (normalized_lora * normalized_orig) * layers_cb_mask
    cb_loss = torch.relu(inner_product.sum(dim=-1)).sum() / layers_cb_mask.sum()
    return cb_loss, retain_loss


# --- cb rr = GraySwan -------------------------------------------------------------------------

def graysawn_loss(trained, frozen, forget, retain, target_layers_hs, current_training_step, max_steps, alpha):
    """lorra_circuit_breaker.py compute_loss: progress = current_training_step / 300 (2 x 150 steps),
    retain anchored over hidden_states 1..max(target) (the truncated model's blocks up to the last
    target), circuit breaker at ``target_layers_hs``."""
    progress = current_training_step / (2 * max_steps)
    retain_coeff, circuit_breaker_coeff = alpha * progress, alpha * (1 - progress)
    with torch.no_grad():
        orig_r, _ = block_outputs(frozen, retain["input_ids"])
        orig_f, _ = block_outputs(frozen, forget["input_ids"])
    lora_r, _ = block_outputs(trained, retain["input_ids"])
    lora_f, _ = block_outputs(trained, forget["input_ids"])
    hs = lambda outs, l: outs[l - 1]  # noqa: E731 -- hidden_states[l] is block l-1's output
    anchored = range(1, max(target_layers_hs) + 1)
    cb_loss, retain_loss = reference_rr_terms(
        [hs(lora_f, l) for l in target_layers_hs], [hs(orig_f, l) for l in target_layers_hs],
        [hs(lora_r, l) for l in anchored], [hs(orig_r, l) for l in anchored],
        forget["attention_mask"], retain["attention_mask"])
    return retain_coeff * retain_loss + circuit_breaker_coeff * cb_loss


def test_cb_rr_reference_preset_equals_grayswan_over_steps():
    trained, frozen = tiny()
    forget, retain = batch(0), batch(1)
    cfg = resolve(PRESETS["cb"]["reference"], "cb", N_LAYERS, target_layers=[1, 2], lora=False)
    assert cfg.cb_variant == "rr" and cfg.alpha == 10.0
    total = 5
    method = package_method(cfg, trained, frozen, total)
    for step in (0, 2, 4):  # the package's 0-based step t is GraySwan's current_training_step t + 1
        ours, metrics = method.loss(forget, retain, step)
        theirs = graysawn_loss(trained, frozen, forget, retain, [2, 3], step + 1, total, 10.0)
        assert float(ours) == pytest.approx(float(theirs), abs=1e-6, rel=1e-6)
        assert metrics["c_retain"] == pytest.approx(10.0 * (step + 1) / (2 * total))
        (g_ours,) = torch.autograd.grad(ours, trained.model.layers[1].mlp.down_proj.weight)
        (g_theirs,) = torch.autograd.grad(theirs, trained.model.layers[1].mlp.down_proj.weight)
        torch.testing.assert_close(g_ours, g_theirs, atol=1e-6, rtol=1e-5)


def test_cb_reference_layers_scale_by_depth():
    """GraySwan's hidden_states 10, 20 at 32 layers: block outputs 9, 19; SmolLM2's 30 blocks: 8, 18."""
    assert resolve(PRESETS["cb"]["reference"], "cb", 32).target_layers == [9, 19]
    assert resolve(PRESETS["cb"]["reference"], "cb", 30).target_layers == [8, 18]
    cfg = resolve(PRESETS["cb_lat"]["reference"], "cb_lat", 32)
    assert cfg.target_layers == [4, 9, 14, 19, 24, 29] and cfg.adversary_layers == [-1]


# --- cb_lat = deep ignorance rr-lat -------------------------------------------------------------

class CombinedAdversary(torch.nn.Module):
    """unlearning.py CombinedAdversary (steering vector + 32-token soft prefix)."""

    def __init__(self, dim):
        super().__init__()
        self.dim, self.sp_size = dim, 32
        self.sv = torch.nn.Parameter(torch.zeros(dim))
        self.sp = torch.nn.Parameter(torch.zeros(1, self.sp_size, dim))

    def forward(self, x):
        x = x + self.sv.view(1, 1, self.dim).expand(x.shape[0], x.shape[1], self.dim).to(x.dtype)
        num_toks = min([self.sp_size, x.shape[1]])
        sp = self.sp.expand(x.shape[0], self.sp_size, self.dim).to(x.dtype)
        return torch.cat((x[:, :num_toks, :] + sp[:, :num_toks, :], x[:, num_toks:, :]), dim=1)


def deep_ignorance_loss(trained, frozen, forget, retain, target_layers_hs, current_training_step, total, retain_coef,
                        remove_coef, adv_lr, attack_iters):
    """RRTrainer.compute_loss with --alg rr-lat and the attack at the embedding (CustomHook on
    embed_tokens): frozen activations first, then gradient_descent_attack (AdamW on the forget
    NLL), then the trained retain and forget passes with the adversary still on."""
    scheduled_coeff = min([1.0, current_training_step / total])
    retain_coeff = retain_coef * scheduled_coeff
    circuit_breaker_coeff = remove_coef * (1 - 0.25 * scheduled_coeff)
    with torch.no_grad():
        orig_r, _ = block_outputs(frozen, retain["input_ids"])
        orig_f, _ = block_outputs(frozen, forget["input_ids"])
    adversary = CombinedAdversary(trained.config.hidden_size)
    hook = (trained.model.embed_tokens, lambda module, args, output: adversary(output))
    adv_optim = torch.optim.AdamW(list(adversary.parameters()), lr=adv_lr)
    losses = []
    for _ in range(attack_iters):
        adv_optim.zero_grad()
        _, logits = block_outputs(trained, forget["input_ids"], [hook])
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), forget["input_ids"][:, 1:].reshape(-1))
        sv_grad, sp_grad = torch.autograd.grad(loss, [adversary.sv, adversary.sp])
        adversary.sv.grad, adversary.sp.grad = sv_grad, sp_grad
        losses.append(float(loss))
        adv_optim.step()
    lora_r, _ = block_outputs(trained, retain["input_ids"], [hook])
    lora_f, _ = block_outputs(trained, forget["input_ids"], [hook])
    hs = lambda outs, l: outs[l - 1]  # noqa: E731
    every = range(1, len(lora_r) + 1)
    cb_loss, retain_loss = reference_rr_terms(
        [hs(lora_f, l) for l in target_layers_hs], [hs(orig_f, l) for l in target_layers_hs],
        [hs(lora_r, l) for l in every], [hs(orig_r, l) for l in every],
        forget["attention_mask"], retain["attention_mask"])
    return retain_coeff * retain_loss + circuit_breaker_coeff * cb_loss, losses


def test_cb_lat_reference_preset_equals_deep_ignorance_rr_lat_over_steps():
    trained, frozen = tiny()
    forget, retain = batch(0, seq=40), batch(1, seq=12)  # forget longer than the 32-token soft prefix
    cfg = resolve(PRESETS["cb_lat"]["reference"], "cb_lat", N_LAYERS, target_layers=[1, 3], lora=False,
                  lat_steps=3, adversary_lr=0.05)
    assert cfg.adversary == "combined" and cfg.adversary_layers == [-1] and cfg.alpha == 5.0
    assert cfg.forget_weight == 60.0 and cfg.lr == 2e-3  # rr-lat.sh: --remove_coef 300 (= 5 x 60) --lr 2e-3
    total = 4
    method = package_method(cfg, trained, frozen, total)
    for step in (0, 2, 4):  # s = 0, 0.5, 1 (capped)
        torch.manual_seed(0)
        ours, metrics = method.loss(forget, retain, step)
        theirs, adv_losses = deep_ignorance_loss(trained, frozen, forget, retain, [2, 4], step, total, 5.0, 300.0,
                                                 0.05, 3)
        assert float(ours) == pytest.approx(float(theirs), abs=1e-6, rel=1e-6)
        assert metrics["adversary_start_nll"] == pytest.approx(adv_losses[0], abs=1e-6, rel=1e-6)
        assert metrics["adversary_nll"] == pytest.approx(adv_losses[-1], abs=1e-6, rel=1e-6)
        assert adv_losses[-1] < adv_losses[0]  # the adversary helps recall
        (g_ours,) = torch.autograd.grad(ours, trained.model.layers[2].self_attn.q_proj.weight)
        (g_theirs,) = torch.autograd.grad(theirs, trained.model.layers[2].self_attn.q_proj.weight)
        torch.testing.assert_close(g_ours, g_theirs, atol=1e-6, rtol=1e-5)


def test_cb_lat_adversary_before_targets_and_its_effect_trains_the_blocks_between():
    """Two target layers; every adversary layer lies strictly before the first one, and the
    forget loss's gradient on the blocks between the adversary and the targets depends on the
    adversary (those blocks can learn to resist it).

    Fails on 405f6ab: there the adversary sat at ``target_layers[len // 2]`` = 3 here, the last
    target, added before the scored activation is captured: ``max(adversary layers) < 2`` fails,
    and no block lies between the adversary and the scored layer 3.
    """
    trained, frozen = tiny()
    forget, retain = batch(0), batch(1)
    cfg = UnlearnConfig("m", "d", "o", "cb_lat", target_layers=[2, 3], cb_variant="rr", lat_steps=3,
                        adversary_lr=0.05)
    cfg.validate()
    cfg.resolve_layers(N_LAYERS)
    method = package_method(cfg, trained, frozen, total_steps=4)
    attack = fit_attack(method.ctx, forget)
    assert attack.forget and max(attack.forget) < min(cfg.target_layers)
    adapter = ArchitectureAdapter(trained)
    _, f_frozen = method.ctx.reference(forget, cfg.target_layers)

    def forget_term(inject):
        _, hidden = forward(trained, adapter, forget, cfg.target_layers, inject)
        return sum(F.cosine_similarity(hidden[i], f_frozen[i], dim=-1).relu().mean() for i in cfg.target_layers)

    between = range(max(attack.forget) + 1, max(cfg.target_layers) + 1)
    assert list(between) == [0, 1, 2, 3]  # the default adversary sits at the embedding output (-1)
    for block in between:
        weights = [p for p in trained.model.layers[block].parameters()]
        attacked = torch.autograd.grad(forget_term(attack.forget), weights)
        clean = torch.autograd.grad(forget_term(None), weights)
        assert sum(float(g.abs().sum()) for g in attacked) > 0
        assert max(float((a - c).abs().max()) for a, c in zip(attacked, clean)) > 1e-6


def test_cb_lat_placement_rules():
    def resolved(**kw):
        cfg = UnlearnConfig("m", "d", "o", "cb_lat", **kw)
        cfg.validate()
        cfg.resolve_layers(N_LAYERS)
        return cfg

    with pytest.raises(UserError, match="strictly before the first target layer 2"):
        resolved(target_layers=[2, 3], adversary_layers=[0, 2])
    with pytest.raises(UserError, match="pgd perturbs one layer"):
        resolved(target_layers=[2, 3], adversary="pgd", adversary_layers=[0, 1])
    with pytest.raises(UserError, match="out of range"):
        resolved(target_layers=[2, 3], adversary_layers=[-2])
    assert resolved(target_layers=[2, 3], adversary="targeted", adversary_layers=[-1, 1]).adversary_lr == 5e-2
    # --preset original keeps the original pipeline's placement (the middle target layer)
    original = resolve(PRESETS["cb_lat"]["original"], "cb_lat", N_LAYERS, target_layers=[1, 2, 3])
    assert original.adversary == "pgd" and original.adversary_layers == [2]
    original.validate()  # a resolved config passes its checks again
    original.resolve_layers(N_LAYERS)
    lat = resolve(PRESETS["lat"]["original"], "lat", N_LAYERS)
    assert lat.adversary == "pgd" and lat.adversary_layers == [3] and lat.lat_defender == "ascent"


# --- lat = targeted LAT -----------------------------------------------------------------------

class GDAdversary(torch.nn.Module):
    """latent_at/laa/attacks.py GDAdversary: a per-token attack on the masked positions, clipped
    to the per-token L2 ball."""

    def __init__(self, dim, epsilon, attack_mask):
        super().__init__()
        self.epsilon = epsilon
        self.attack = torch.nn.Parameter(torch.zeros(attack_mask.shape[0], attack_mask.shape[1], dim))
        self.clip_attack()
        self.attack_mask = attack_mask

    def forward(self, x):
        mask = self.attack_mask[:, :x.shape[1]]
        x = x.clone()
        x[mask] = x[mask] + self.attack[mask].to(x.dtype)
        return x

    def clip_attack(self):
        with torch.no_grad():
            norms = torch.norm(self.attack, dim=-1, keepdim=True)
            scale = torch.clamp(norms / self.epsilon, min=1)
            self.attack.div_(scale)


def log_1_minus_p_loss(logits, labels, threshold=-5.0):
    """latent_at/utils.py log_1_minus_p_loss (from HarmBench), verbatim."""
    log_sum_exp_all = torch.logsumexp(logits, dim=-1)
    gather_labels = labels.clone()
    gather_labels[labels == -100] = 0
    logits_for_labels = torch.gather(logits, -1, gather_labels.unsqueeze(-1)).squeeze(-1)
    log_p = logits_for_labels - log_sum_exp_all
    mask = torch.zeros_like(logits).scatter_(-1, gather_labels.unsqueeze(-1), 1.0)
    masked_logits = logits * (1 - mask) + mask * (-1e10)
    log_sum_exp_without_true_label = torch.logsumexp(masked_logits, dim=-1)
    log_1_minus_p = log_sum_exp_without_true_label - log_sum_exp_all
    ignored_values = (labels == -100)
    log_1_minus_p[ignored_values] = 0
    below_threshold = (log_p < threshold)
    log_1_minus_p[below_threshold] = 0
    return -log_1_minus_p.sum() / (~ignored_values).sum().float()


def targeted_lat_loss(trained, forget, retain, layers, epsilon, inner_lr, iterations, away_coef, sft_coef):
    """projected_gradient_descent (adversary at each layer's mlp output, AdamW, clip after every
    step, toward loss = CE on the forget text), then do_defense_step: away loss under the attack +
    sft (retain CE) with the wrappers disabled, coefficients normalised (normalize_dict)."""
    mask = forget["attention_mask"].bool()
    adversaries = [GDAdversary(trained.config.hidden_size, epsilon, mask) for _ in layers]
    hooks = [(trained.model.layers[layer].mlp, (lambda adv: lambda module, args, output: adv(output))(adv))
             for layer, adv in zip(layers, adversaries)]
    params = [p for adv in adversaries for p in adv.parameters()]
    adv_optim = torch.optim.AdamW(params, lr=inner_lr)
    losses = []
    ids = forget["input_ids"]
    for _ in range(iterations):
        adv_optim.zero_grad()
        _, logits = block_outputs(trained, ids, hooks)
        toward_loss = F.cross_entropy(logits[:, :-1][mask[:, 1:]], ids[:, 1:][mask[:, 1:]])
        grads = torch.autograd.grad(toward_loss, params)
        for p, g in zip(params, grads):
            p.grad = g
        losses.append(float(toward_loss))
        adv_optim.step()
        for adv in adversaries:
            adv.clip_attack()
    total = away_coef + sft_coef
    _, logits = block_outputs(trained, ids, hooks)
    away_loss = log_1_minus_p_loss(logits[:, :-1][mask[:, 1:]], ids[:, 1:][mask[:, 1:]])
    _, retain_logits = block_outputs(trained, retain["input_ids"])
    sft_loss = F.cross_entropy(retain_logits[:, :-1].reshape(-1, retain_logits.shape[-1]),
                               retain["input_ids"][:, 1:].reshape(-1))
    return away_coef / total * away_loss + sft_coef / total * sft_loss, losses, adversaries


@pytest.mark.parametrize("layers", [[1], [0, 2]])
def test_lat_reference_preset_equals_targeted_lat(layers):
    trained, _ = tiny(noise=0.0)
    forget, retain = batch(0), batch(1)
    cfg = resolve(PRESETS["lat"]["reference"], "lat", N_LAYERS, adversary_layers=layers, lora=False, lat_steps=6,
                  lat_eps=0.5)
    assert (cfg.adversary, cfg.lat_defender, cfg.adversary_lr, cfg.lat_sft_coef) == ("targeted", "away", 5e-2, 4.0)
    method = package_method(cfg, trained, None, total_steps=3)
    ours, metrics = method.loss(forget, retain, 0)
    theirs, adv_losses, adversaries = targeted_lat_loss(trained, forget, retain, layers, 0.5, 5e-2, 6, 1.0, 4.0)
    assert float(ours) == pytest.approx(float(theirs), abs=1e-6, rel=1e-6)
    assert metrics["adversary_start_nll"] == pytest.approx(adv_losses[0], abs=1e-6, rel=1e-6)
    assert metrics["adversary_nll"] == pytest.approx(adv_losses[-1], abs=1e-6, rel=1e-6)
    assert adv_losses[-1] < adv_losses[0]
    for adv in adversaries:  # the clip binds: every token's perturbation sits on the eps ball
        assert float(adv.attack.norm(dim=-1).max()) == pytest.approx(0.5, abs=1e-5)
    weight = trained.model.layers[1].mlp.up_proj.weight
    torch.testing.assert_close(torch.autograd.grad(ours, weight)[0], torch.autograd.grad(theirs, weight)[0],
                               atol=1e-6, rtol=1e-5)


def test_away_loss_is_bounded_and_ignores_unlikely_tokens():
    """log(1 - p) is bounded where ascent on NLL is not: a token with p -> 0 adds 0, not +inf."""
    from unlearn_lens.unlearning.losses import log_one_minus_p_loss

    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 1] = 10.0  # token 1 likely after position 0
    logits[0, 1, 2] = -20.0  # token 2 very unlikely after position 1 (log p < -5): contributes 0
    ids = torch.tensor([[0, 1, 2]])
    loss = log_one_minus_p_loss(logits, ids, torch.ones_like(ids))
    one_minus_p = 3 / (3 + math.exp(10.0))  # the three other tokens' share at position 0
    assert float(loss) == pytest.approx(-math.log(one_minus_p) / 2, rel=1e-5)


# --- original = what unlearn did before presets -------------------------------------------------

@pytest.mark.parametrize("method", ["cb", "cb_lat", "lat"])
def test_original_preset_reproduces_the_train_log_of_405f6ab(method, tmp_path):
    """tests/data/unlearn_golden/<method>_train_log.csv were written by record_adversarial.py on
    405f6ab (before presets); the same run with the ``original`` preset's values logs the same."""
    import csv
    from pathlib import Path

    from conftest import write_unlearn_data
    from unlearn_lens.testing import save_tiny_model
    from unlearn_lens.unlearning.trainer import run_unlearning

    model = str(save_tiny_model("gpt_neox", tmp_path / "m"))
    data = str(write_unlearn_data(tmp_path / "d"))
    values = dict(PRESETS[method]["original"].values)
    values.update(steps=3, batch_size=2, max_length=16, device="cpu", lr=1e-3, eval_every=1, layer_id=1)
    if method == "cb_lat":
        values["target_layers"] = [1, 2]
    cfg = UnlearnConfig(model, data, str(tmp_path / "out"), method, **values)
    run_unlearning(cfg, progress=False)
    golden = Path(__file__).parent / "data" / "unlearn_golden" / f"{method}_train_log.csv"
    want = list(csv.DictReader(golden.open()))
    got = list(csv.DictReader((tmp_path / "out" / "train_log.csv").open()))
    assert len(got) == len(want) == 3 and list(got[0]) == list(want[0])
    for row_got, row_want in zip(got, want):
        for key in row_want:
            assert float(row_got[key]) == pytest.approx(float(row_want[key]), rel=1e-6, abs=1e-7), key


@pytest.mark.parametrize("family", ["gpt_neox", "llama", "gpt2"])
def test_injection_at_minus_one_adds_to_the_embedding_output(family):
    """Layer -1 (the combined adversary's default) is the embedding output: the same logits as
    feeding ``inputs_embeds = embed(ids) + delta`` (GPT-2 adds its position embedding after)."""
    from unlearn_lens.unlearning.hooks import tap_blocks

    model, _ = make_tiny_model(family, layers=2)
    ids = batch(0, seq=6)["input_ids"]
    delta = torch.randn(1, 6, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(inputs_embeds=model.get_input_embeddings()(ids) + delta).logits
        with tap_blocks(ArchitectureAdapter(model), inject={-1: delta}):
            got = model(input_ids=ids).logits
        clean = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert float((got - clean).abs().max()) > 1e-3
