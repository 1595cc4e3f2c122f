"""cb (rr), cb_lat and lat against unmodified transcriptions of their reference code.

Each transcription is written here with plain torch, PEFT and the model's own modules (nothing
from ``unlearning/losses.py``, ``adversary.py`` or ``hooks.py``), from:

- GraySwanAI/circuit-breakers ``src/lorra_circuit_breaker.py`` ``compute_loss`` and ``train``
  (copy: EleutherAI/unlearn ``unlearn/reference/grey_swan_circuit_breaker/lorra.py``; retain text
  left-padded to ``model_max_length`` by ``cb_train_dataset.py``);
- EleutherAI/unlearn ``unlearn/reference/cas/unlearning.py`` ``RRTrainer.compute_loss``,
  ``CombinedAdversary``, ``gradient_descent_attack`` and its LoRA set-up (deep ignorance's rr-lat;
  texts left-padded to ``MAX_LENGTH`` by ``utils.py``);
- aengusl/latent-adversarial-training ``latent_at/laa/attacks.py`` ``GDAdversary``,
  ``latent_at/lat_methods.py`` ``projected_gradient_descent``, ``latent_at/lat_helpers.py``
  ``do_adversary_step`` / ``do_defense_step`` / ``compute_toward_away_loss``, ``latent_at/
  lat_datasets.py`` ``WMDPLATTargetedDataCollator``, ``latent_at/utils.py`` ``log_1_minus_p_loss``
  and ``normalize_dict``.

A transcription takes the reference's choices as keyword arguments whose defaults are the
reference's own (its padding, its full ``hidden_states`` stack, its schedule, its LoRA path, its
adversaries); each documented deviation of the package is one keyword switched to the package's
choice. ``walk`` goes down that chain from the unmodified reference, asserting the size of every
step on the fixed batch (so a deviation cannot grow unseen: the README's method table lists these
sizes), and asserts that the last link equals the package. The cb and cb_lat models are float32:
the references take their norms with ``dtype=torch.float``, which torch refuses on float64 input
(and the package takes them in float32 too), so values agree to float32 rounding (tolerance
F32-ORDER); the lat model is float64.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import UNLEARN_FORGET, UNLEARN_RETAIN
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


def peft_tiny(n_layers, target_modules, moved_blocks, seed=1):
    """A tiny float32 Llama under PEFT LoRA (r 4, alpha 8, dropout 0) on ``target_modules`` of every
    block, whose ``lora_B`` of ``moved_blocks`` hold seeded noise (a run some steps in; the others
    stay at their zero start, as the package's frozen blocks after the last target do)."""
    from peft import LoraConfig, get_peft_model

    base, tokenizer = make_tiny_model("llama", seed=0, layers=n_layers)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            block = int(name.split(".layers.")[1].split(".")[0]) if ".layers." in name else -1
            if "lora_B" in name and block in moved_blocks:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.eval()
    return model, tokenizer


def package_lora_method(cfg, model, total_steps):
    """The package's method on a PEFT model, as ``trainer.train`` sets it up under ``--lora``."""
    adapter = ArchitectureAdapter(model.get_base_model())
    ctx = MethodContext(cfg, model, adapter, total_steps, Reference(model, adapter, disable=model.disable_adapter),
                        plain_model=model, hidden_size=model.config.hidden_size)
    return build_method(ctx)


def encode(tokenizer, texts, max_length, side="right", to_max_length=False):
    """Token ids and mask: the package's loader (right padding to the longest text, truncation at
    ``max_length``) or, with ``to_max_length``, the references' ``padding="max_length"``."""
    previous, tokenizer.padding_side = tokenizer.padding_side, side
    try:
        enc = tokenizer(texts, truncation=True, max_length=max_length, return_tensors="pt",
                        padding="max_length" if to_max_length else True)
    finally:
        tokenizer.padding_side = previous
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def block_outputs(model, ids, extra_hooks=(), attention_mask=None):
    """Every block's output (hooks on the blocks), the logits; ``extra_hooks`` are (module, hook)
    pairs registered for the pass."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    outs = {}

    def grab(i):
        def hook(module, args, output):
            outs[i] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [layer.register_forward_hook(grab(i)) for i, layer in enumerate(base.model.layers)]
    handles += [module.register_forward_hook(hook) for module, hook in extra_hooks]
    try:
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids) if attention_mask is None
                       else attention_mask).logits
    finally:
        for h in handles:
            h.remove()
    return [outs[i] for i in range(len(outs))], logits


def hidden_states_and_blocks(model, inputs):
    """``(hidden_states, block outputs)`` of one pass: HF's ``output_hidden_states`` (entry 0 the
    embedding output, entry l block l-1's output, the last one after the final norm) and every
    block's raw output (the package's stack)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = {}
    handles = [layer.register_forward_hook(
        lambda module, args, output, i=i: blocks.__setitem__(i, output[0] if isinstance(output, tuple) else output))
        for i, layer in enumerate(base.model.layers[: base.config.num_hidden_layers])]
    try:
        hidden = model(**inputs, output_hidden_states=True)["hidden_states"]
    finally:
        for h in handles:
            h.remove()
    return hidden, [blocks[i] for i in range(len(blocks))]


def walk(chain, ours, sizes):
    """``chain``: [(deviation, value)], the unmodified reference first, then one deviation switched
    to the package's choice per link. Asserts each link's change against ``sizes`` (measured on this
    batch) and the last link against the package's value ``ours``.

    Tolerance F32-ORDER: float32 losses of size L carry about L x 1e-6 of rounding that another CPU
    or thread count sums differently, so a link's change is asserted to 1e-3 relative plus
    1e-5 x the largest loss of the chain (a size of 0.0 means: below that), the package's loss to 1e-5."""
    values = [float(v) for _, v in chain]
    measured = {name: values[i] - values[i - 1] for i, (name, _) in enumerate(chain) if i}
    assert set(measured) == set(sizes), measured
    scale = max(abs(v) for v in values)
    for name, size in sizes.items():
        assert measured[name] == pytest.approx(size, rel=1e-3, abs=1e-5 * scale), (name, measured)
    assert float(ours) == pytest.approx(values[-1], rel=1e-5, abs=1e-8), (float(ours), values)
    return measured


# --- cb rr = GraySwan -------------------------------------------------------------------------

def grayswan_loss(model, tokenizer, forget_texts, retain_texts, target_layers, current_training_step, alpha,
                  max_length, *, left_pad_retain=True, stack="hidden_states"):
    """``compute_loss`` of lorra_circuit_breaker.py on ``model``: a PEFT model on the base truncated
    after hidden_states ``max(target_layers)`` (``train``: ``drop_layers_after``), so its
    hidden_states are the embedding output, the blocks' outputs and the last block's after the
    final norm. ``current_training_step`` is the value after the reference's increment (from 1);
    progress = step / 300. The circuit-breaker text is right-padded to ``max_length`` (its
    response half; plain forget text has no request half), the retain text left-padded to it.

    Deviations (the package's choice): ``left_pad_retain=False`` right-pads the retain text;
    ``stack="blocks"`` anchors the raw outputs of blocks 0 .. max(target_layers) - 1 instead of
    every hidden_states entry (no embedding entry, no final-normed last block)."""
    progress = current_training_step / 300
    retain_coeff, circuit_breaker_coeff = alpha * progress, alpha * (1 - progress)
    cb = encode(tokenizer, forget_texts, max_length, "right", to_max_length=True)
    retain = encode(tokenizer, retain_texts, max_length, "left" if left_pad_retain else "right", to_max_length=True)

    def retain_stack(inputs):
        hidden, blocks = hidden_states_and_blocks(model, inputs)
        return list(hidden) if stack == "hidden_states" else blocks[: max(target_layers)]

    layers_circuit_breaker_attention_mask = cb["attention_mask"].repeat(len(target_layers), 1, 1).unsqueeze(-1)
    with model.disable_adapter():
        model.eval()
        with torch.no_grad():
            orig_retain_outputs = retain_stack(retain)
            orig_retain_hidden = torch.stack(orig_retain_outputs).detach()
            layers_retain_attention_mask = retain["attention_mask"].repeat(
                len(orig_retain_outputs), 1, 1).unsqueeze(-1)
            orig_retain_hidden *= layers_retain_attention_mask
            circuit_breaker_outputs = model(**cb, output_hidden_states=True)["hidden_states"]
            circuit_breaker_hidden = torch.stack([circuit_breaker_outputs[l].detach() for l in target_layers])
    model.train()
    lora_retain_hidden = torch.stack(retain_stack(retain)) * layers_retain_attention_mask
    retain_loss = torch.norm(lora_retain_hidden - orig_retain_hidden, dim=-1, p=2, dtype=torch.float).nanmean()
    lora_circuit_breaker_outputs = model(**cb, output_hidden_states=True)["hidden_states"]
    lora_circuit_breaker_hidden = torch.stack([lora_circuit_breaker_outputs[l] for l in target_layers])
    normalized_lora_circuit_breaker_outputs = lora_circuit_breaker_hidden / (
        torch.norm(lora_circuit_breaker_hidden, dim=-1, keepdim=True, dtype=torch.float))
    normalized_circuit_breaker_outputs = circuit_breaker_hidden / (
        torch.norm(circuit_breaker_hidden, dim=-1, keepdim=True, dtype=torch.float))
    inner_product = (normalized_lora_circuit_breaker_outputs * normalized_circuit_breaker_outputs
                     ) * layers_circuit_breaker_attention_mask
    circuit_breaker_loss = torch.relu(inner_product.sum(dim=-1)).sum() / layers_circuit_breaker_attention_mask.sum()
    model.eval()
    return retain_coeff * retain_loss + circuit_breaker_coeff * circuit_breaker_loss


def truncated(model, n_blocks):
    """A copy of a PEFT Llama cut after ``n_blocks`` blocks (GraySwan's ``drop_layers_after``)."""
    cut = copy.deepcopy(model)
    base = cut.get_base_model()
    base.model.layers = base.model.layers[:n_blocks]
    base.config.num_hidden_layers = n_blocks
    return cut


#: GraySwan chain, measured on this batch (6-layer tiny Llama, hidden_states 2 and 4, 48 tokens):
#: per current_training_step, the change of each deviation. Left padding changes nothing beyond
#: rounding (RoPE is relative); the stack's extra entries (the embedding output, unchanged by LoRA,
#: and the final-normed output of block 4) change the retain term.
GRAYSWAN_DEVIATIONS = {
    1: {"right-padded retain": 0.0, "package stack": -0.019698},
    75: {"right-padded retain": 0.0, "package stack": -1.47740},
    150: {"right-padded retain": 0.0, "package stack": -2.95480},
}


@pytest.mark.parametrize("step", [1, 75, 150])
def test_cb_rr_reference_preset_against_grayswan_unmodified(step):
    """The LoRA path (adapters on every linear, frozen passes with the adapters disabled, eval mode),
    the retain text padded to --max-length and averaged over every position (--rr-retain-mean
    padded), the schedule t/300 of the reference's 150 steps: equal but for the stack."""
    model, tokenizer = peft_tiny(6, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                 moved_blocks=range(4))
    max_length = 48
    forget_texts, retain_texts = UNLEARN_FORGET[:2], UNLEARN_RETAIN[:2]
    cfg = resolve(PRESETS["cb"]["reference"], "cb", 6, target_layers=[1, 3], max_length=max_length)
    assert (cfg.rr_retain_mean, cfg.alpha, cfg.steps) == ("padded", 10.0, 150)
    method = package_lora_method(cfg, model, cfg.steps)
    forget, retain = encode(tokenizer, forget_texts, max_length), encode(tokenizer, retain_texts, max_length)
    assert not bool(retain["attention_mask"].all())  # padding is exercised
    ours, metrics = method.loss(forget, retain, step - 1)  # the package's 0-based step t is the reference's t + 1
    assert metrics["c_retain"] == pytest.approx(10.0 * step / 300)
    reference = truncated(model, 5)  # hidden_states 2, 4 of 6 blocks: the model cut after block 4
    args = (reference, tokenizer, forget_texts, retain_texts, [2, 4], step, 10.0, max_length)
    chain = [("unmodified", grayswan_loss(*args)),
             ("right-padded retain", grayswan_loss(*args, left_pad_retain=False)),
             ("package stack", grayswan_loss(*args, left_pad_retain=False, stack="blocks"))]
    walk(chain, ours, GRAYSWAN_DEVIATIONS[step])
    # the same state's gradient (the adapters of block 1, between the two scored layers)
    weight = next(p for n, p in model.named_parameters() if "layers.1.mlp.down_proj.lora_B" in n)
    reference_weight = next(p for n, p in reference.named_parameters() if "layers.1.mlp.down_proj.lora_B" in n)
    (g_ours,) = torch.autograd.grad(ours, weight)
    (g_theirs,) = torch.autograd.grad(grayswan_loss(*args, left_pad_retain=False, stack="blocks"), reference_weight)
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-7, rtol=1e-5)


def test_rr_padded_retain_mean_is_the_token_mean_times_the_fill_ratio():
    """--rr-retain-mean padded (the references' nanmean over the padded batch) against tokens:
    the retain term scales by real tokens / (batch x max-length)."""
    model, tokenizer = peft_tiny(4, ["q_proj", "v_proj"], moved_blocks=range(4))
    retain = encode(tokenizer, UNLEARN_RETAIN[:2], 48)
    forget = encode(tokenizer, UNLEARN_FORGET[:2], 48)
    terms = {}
    for mean in ("tokens", "padded"):
        cfg = resolve(PRESETS["cb"]["reference"], "cb", 4, target_layers=[1, 3], max_length=48, rr_retain_mean=mean)
        _, metrics = package_lora_method(cfg, model, 150).loss(forget, retain, 10)
        terms[mean] = metrics["retain_loss"]
    fill = float(retain["attention_mask"].sum()) / (2 * 48)
    assert 0.5 < fill < 1 and terms["tokens"] > 0
    assert terms["padded"] == pytest.approx(terms["tokens"] * fill, rel=1e-6)


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
        if x.shape[1] == 1:
            return x
        x = x + self.sv.view(1, 1, self.dim).expand(x.shape[0], x.shape[1], self.dim).to(x.dtype)
        num_toks = min([self.sp_size, x.shape[1]])
        sp = self.sp.expand(x.shape[0], self.sp_size, self.dim).to(x.dtype)
        return torch.cat((x[:, :num_toks, :] + sp[:, :num_toks, :], x[:, num_toks:, :]), dim=1)


def deep_ignorance_loss(model, tokenizer, forget_texts, retain_texts, layers, current_training_step, total_micro_steps,
                        retain_coef, remove_coef, adv_lr, attack_iters, max_length, *, mlp_adversaries=True,
                        left_pad=True, labels_on_padding=True, stack="hidden_states"):
    """``RRTrainer.compute_loss`` with ``--alg rr-lat`` on a PEFT model: texts left-padded to
    ``max_length`` (labels = input_ids, padding included), frozen activations first (adapters
    disabled, eval mode), then ``gradient_descent_attack`` on the first two texts with a
    CombinedAdversary at the embedding and at the MLP output of each block ``layers`` (the
    hidden_states indices, used as block indices there), AdamW on the HF loss, ``loss.backward()``
    (which also fills the LoRA weights' ``.grad``), then the retain and forget passes with every
    adversary still on, retain anchored over every hidden_states entry, nanmean / nansum.
    Returns ``(loss, adversary losses, the LoRA gradients the attack left)``.

    Deviations (the package's choice): ``mlp_adversaries=False`` keeps only the embedding
    adversary; ``left_pad=False`` right-pads (the soft prefix then lands on the first real tokens);
    ``labels_on_padding=False`` leaves padding out of the adversary's NLL; ``stack="blocks"``
    anchors every block's raw output instead of every hidden_states entry."""
    scheduled_coeff = min([1.0, current_training_step / total_micro_steps])
    retain_coeff = retain_coef * scheduled_coeff
    circuit_breaker_coeff = remove_coef * (1 - 0.25 * scheduled_coeff)
    side = "left" if left_pad else "right"
    retain = encode(tokenizer, retain_texts, max_length, side, to_max_length=True)
    cb = encode(tokenizer, forget_texts, max_length, side, to_max_length=True)
    base = model.get_base_model()

    def retain_stack(inputs):
        hidden, blocks = hidden_states_and_blocks(model, inputs)
        return list(hidden) if stack == "hidden_states" else blocks

    layers_circuit_breaker_attention_mask = cb["attention_mask"].repeat(len(layers), 1, 1).unsqueeze(-1)
    with model.disable_adapter():
        model.eval()
        with torch.no_grad():
            if retain_coeff > 0:
                orig_retain_outputs = retain_stack(retain)
                orig_retain_hidden = torch.stack(orig_retain_outputs).detach()
                layers_retain_attention_mask = retain["attention_mask"].repeat(
                    len(orig_retain_outputs), 1, 1).unsqueeze(-1)
                orig_retain_hidden *= layers_retain_attention_mask
            circuit_breaker_outputs = model(**cb, output_hidden_states=True)["hidden_states"]
            circuit_breaker_hidden = torch.stack([circuit_breaker_outputs[l].detach() for l in layers])

    # gradient_descent_attack
    num_attack = 2
    away_labels = cb["input_ids"][:num_attack]
    away_labels_mask = cb["attention_mask"][:num_attack]
    labels = away_labels if labels_on_padding else away_labels.masked_fill(away_labels_mask == 0, -100)
    model.eval()
    locations = [base.model.layers[layer].mlp for layer in layers] if mlp_adversaries else []
    locations.append(base.model.embed_tokens)
    adversaries = [CombinedAdversary(model.config.hidden_size) for _ in locations]
    handles = [module.register_forward_hook(lambda module, args, output, adv=adv: adv(output))
               for module, adv in zip(locations, adversaries)]
    params = [p for adv in adversaries for p in adv.parameters()]
    adv_optim = torch.optim.AdamW(params, lr=adv_lr)
    losses = []
    try:
        for _ in range(int(attack_iters)):
            adv_optim.zero_grad()
            loss = model(input_ids=away_labels, attention_mask=away_labels_mask, labels=labels).loss
            loss.backward()
            losses.append(float(loss.detach()))
            adv_optim.step()
        leaked = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        model.train()
        retain_loss = 0
        if retain_coeff > 0:
            lora_retain_hidden = torch.stack(retain_stack(retain)) * layers_retain_attention_mask
            retain_loss = torch.norm(lora_retain_hidden - orig_retain_hidden, dim=-1, p=2, dtype=torch.float).nanmean()
        lora_circuit_breaker_outputs = model(**cb, output_hidden_states=True)["hidden_states"]
        lora_circuit_breaker_hidden = torch.stack([lora_circuit_breaker_outputs[l] for l in layers])
        normalized_lora_circuit_breaker_outputs = lora_circuit_breaker_hidden / (
            torch.norm(lora_circuit_breaker_hidden, dim=-1, keepdim=True, dtype=torch.float))
        normalized_circuit_breaker_outputs = circuit_breaker_hidden / (
            torch.norm(circuit_breaker_hidden, dim=-1, keepdim=True, dtype=torch.float))
        inner_product = (normalized_lora_circuit_breaker_outputs * normalized_circuit_breaker_outputs
                         ) * layers_circuit_breaker_attention_mask
        circuit_breaker_loss = (torch.relu(inner_product.nansum(dim=-1)).nansum()
                                / layers_circuit_breaker_attention_mask.sum())
        loss = retain_coeff * retain_loss + circuit_breaker_coeff * circuit_breaker_loss
    finally:
        for h in handles:
            h.remove()
        model.eval()
    return loss, losses, leaked


#: deep ignorance chain, measured on this batch (6-layer tiny Llama, hidden_states 2 and 4, 48
#: tokens, adversary lr 0.05 x 3): per step t of 4, the change of each deviation.
DEEP_IGNORANCE_DEVIATIONS = {
    0: {"no MLP adversaries": 12.6326, "right padding": 12.8625, "no labels on padding": -0.04612, "package stack": 0.0},
    2: {"no MLP adversaries": 10.2585, "right padding": 11.4250, "no labels on padding": 0.03644,
        "package stack": -1.90036},
    4: {"no MLP adversaries": 7.88446, "right padding": 9.98743, "no labels on padding": 0.11900,
        "package stack": -3.80072},
}


@pytest.mark.parametrize("step", [0, 2, 4])
def test_cb_lat_reference_preset_against_deep_ignorance_unmodified(step):
    """PEFT's default modules (q_proj, v_proj for Llama, target_modules=None), frozen passes with the
    adapters disabled, the combined adversary kept on for the retain pass, the schedule s = min(1,
    t/T), retain averaged over every padded position (--rr-retain-mean padded)."""
    model, tokenizer = peft_tiny(6, None, moved_blocks=range(4))
    max_length = 48
    forget_texts, retain_texts = UNLEARN_FORGET[:2], UNLEARN_RETAIN[:2]
    cfg = resolve(PRESETS["cb_lat"]["reference"], "cb_lat", 6, target_layers=[1, 3], max_length=max_length,
                  lat_steps=3, adversary_lr=0.05)
    assert (cfg.adversary, cfg.adversary_layers, cfg.alpha, cfg.forget_weight) == ("combined", [-1], 5.0, 60.0)
    assert (cfg.rr_retain_mean, cfg.lora_targets) == ("padded", ["peft-default"])
    total = 4
    method = package_lora_method(cfg, model, total)
    forget, retain = encode(tokenizer, forget_texts, max_length), encode(tokenizer, retain_texts, max_length)
    ours, metrics = method.loss(forget, retain, step)
    args = (model, tokenizer, forget_texts, retain_texts, [2, 4], step, total, 5.0, 300.0, 0.05, 3, max_length)
    unmodified, _, leaked = deep_ignorance_loss(*args)
    links = [("no MLP adversaries", {"mlp_adversaries": False}), ("right padding", {"left_pad": False}),
             ("no labels on padding", {"labels_on_padding": False}), ("package stack", {"stack": "blocks"})]
    chain, switched = [("unmodified", unmodified)], {}
    for name, switch in links:
        switched.update(switch)
        value, adv_losses, _ = deep_ignorance_loss(*args, **switched)
        chain.append((name, value))
    walk(chain, ours, DEEP_IGNORANCE_DEVIATIONS[step])
    assert metrics["adversary_start_nll"] == pytest.approx(adv_losses[0], rel=1e-6)
    assert metrics["adversary_nll"] == pytest.approx(adv_losses[-1], rel=1e-6)
    assert adv_losses[-1] < adv_losses[0]  # the adversary helps recall
    # gradient of a LoRA weight between the adversary and the scored layers; the reference's attack
    # also leaves its own gradients (lowering forget NLL) in the LoRA weights' .grad, which the
    # optimizer step then adds: their size against the loss's gradient, on this batch
    name = "base_model.model.model.layers.2.self_attn.q_proj.lora_B.default.weight"
    weight = dict(model.named_parameters())[name]
    (g_ours,) = torch.autograd.grad(ours, weight)
    final, _, leaked = deep_ignorance_loss(*args, **switched)
    (g_theirs,) = torch.autograd.grad(final, weight)
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-7, rtol=1e-5)
    leak_ratio = float(leaked[name].norm() / g_theirs.norm())
    assert leak_ratio == pytest.approx(DEEP_IGNORANCE_LEAK[step], rel=1e-3)


#: ||the gradient the reference's attack loop leaves in a LoRA weight (block 2's q_proj B), which its
#: optimizer step adds to the loss's|| / ||the loss's gradient there||, per step, on this batch, for the
#: attack as the package runs it (the package leaves none: torch.autograd.grad on the perturbation
#: alone). Measured at the chain's last link: with the reference's left padding the loss's gradient
#: is NaN on this CPU (SDPA's backward through fully masked padded rows; the forward is finite).
DEEP_IGNORANCE_LEAK = {0: 0.048427, 2: 0.054879, 4: 0.063294}


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


# --- LoRA targets -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt_neox", "llama", "gpt2"])
def test_peft_default_targets_are_what_peft_resolves_for_none(family):
    """``--lora-targets peft-default`` (the cb_lat reference preset's): the modules PEFT adapts
    when deep ignorance passes ``target_modules=None``; ``all-linear`` (the default) every linear."""
    from peft import LoraConfig, get_peft_model

    from unlearn_lens.unlearning.lora import LORA_TARGETS, resolve_targets

    model, _ = make_tiny_model(family, layers=2)
    ours = resolve_targets(model, family, ["peft-default"])
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=None, task_type="CAUSAL_LM"))
    assert set(ours) == set(peft_model.peft_config["default"].target_modules)
    assert len(ours) < len(LORA_TARGETS[family])
    assert resolve_targets(model, family, None) == resolve_targets(model, family, ["all-linear"]) == LORA_TARGETS[family]
    with pytest.raises(UserError, match="stands alone"):
        resolve_targets(model, family, ["peft-default", "q_proj"])


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


def normalize_dict(coefs):
    """latent_at/utils.py normalize_dict."""
    total = sum(coefs.values())
    return {key: value / total for key, value in coefs.items()}


def targeted_collate(tokenizer, forget_texts, retain_texts):
    """lat_datasets.py WMDPLATTargetedDataCollator: each text tokenized alone, both padded with EOS
    to the longest of either, masks on the real tokens (truncation at 600 does not bind here)."""
    adv = [tokenizer(t)["input_ids"] for t in forget_texts]
    defense = [tokenizer(t)["input_ids"] for t in retain_texts]
    pad_length = max(max(map(len, adv)), max(map(len, defense)))

    def pad(rows):
        ids = torch.tensor([r + [tokenizer.eos_token_id] * (pad_length - len(r)) for r in rows])
        mask = torch.tensor([[True] * len(r) + [False] * (pad_length - len(r)) for r in rows])
        return ids, mask

    (adv_tokens, adv_labels_mask), (def_tokens, def_labels_mask) = pad(adv), pad(defense)
    return {"adv_tokens": adv_tokens, "adv_labels_mask": adv_labels_mask, "def_tokens": def_tokens,
            "def_labels_mask": def_labels_mask}


def targeted_lat_loss(model, tokenizer, forget_texts, retain_texts, sft_texts, layers, epsilon, inner_lr, iterations,
                      adv_loss_coefs, def_loss_coefs):
    """projected_gradient_descent (a GDAdversary on each layer's MLP output with the forget text's
    mask, AdamW, clip after every step; do_adversary_step: toward = CE on the forget text, away =
    log(1 - p) on the retain text, both under the attack, coefficients normalised), then
    do_defense_step: toward = CE on the retain text under the attack, away = log(1 - p) on the
    forget text under the attack, sft = CE on the SFT batch with the attack off, normalised. The
    model runs without an attention mask (right padding), as there. The WMDP notebook's SFT batch
    is Alpaca (``sft_texts``); the package uses the retain batch."""
    batch = targeted_collate(tokenizer, forget_texts, retain_texts)
    sft = targeted_collate(tokenizer, sft_texts, sft_texts)  # WMDPLATDataCollator pads the same way
    sft_ids, sft_mask = sft["def_tokens"], sft["def_labels_mask"]
    adv_coefs, def_coefs = normalize_dict(adv_loss_coefs), normalize_dict(def_loss_coefs)
    adversaries = [GDAdversary(model.config.hidden_size, epsilon, batch["adv_labels_mask"]) for _ in layers]
    hooks = [(model.model.layers[layer].mlp, (lambda adv: lambda module, args, output: adv(output))(adv))
             for layer, adv in zip(layers, adversaries)]
    params = [p for adv in adversaries for p in adv.parameters()]
    adv_optim = torch.optim.AdamW(params, lr=inner_lr)

    def ce(tokens, mask, attack):
        _, logits = block_outputs(model, tokens, hooks if attack else ())
        return F.cross_entropy(logits[:, :-1][mask[:, 1:]], tokens[:, 1:][mask[:, 1:]])

    def away(tokens, mask):
        _, logits = block_outputs(model, tokens, hooks)
        return log_1_minus_p_loss(logits[:, :-1][mask[:, 1:]], tokens[:, 1:][mask[:, 1:]])

    losses = []
    for _ in range(iterations):
        adv_optim.zero_grad()
        toward_loss = ce(batch["adv_tokens"], batch["adv_labels_mask"], True)
        away_loss = away(batch["def_tokens"], batch["def_labels_mask"])
        grads = torch.autograd.grad(adv_coefs["toward"] * toward_loss + adv_coefs["away"] * away_loss, params)
        for p, g in zip(params, grads):
            p.grad = g
        losses.append(float(toward_loss))
        adv_optim.step()
        for adv in adversaries:
            adv.clip_attack()
    toward = ce(batch["def_tokens"], batch["def_labels_mask"], True)
    away_term = away(batch["adv_tokens"], batch["adv_labels_mask"])
    sft_loss = ce(sft_ids, sft_mask, False)
    loss = def_coefs["toward"] * toward + def_coefs["away"] * away_term + def_coefs["sft"] * sft_loss
    return loss, losses, adversaries


#: targeted LAT chain, measured on this batch: the package's SFT term reads the retain batch, the
#: notebook's an Alpaca batch (here two other retain texts stand in for it).
TARGETED_LAT_DEVIATIONS = {(1,): {"sft on the retain batch": 0.0153088}, (0, 2): {"sft on the retain batch": 0.0153088}}


@pytest.mark.parametrize("layers", [[1], [0, 2]])
def test_lat_reference_preset_against_targeted_lat_unmodified(layers):
    model, tokenizer = make_tiny_model("llama", seed=0, layers=N_LAYERS)
    model = model.double()
    forget_texts, retain_texts, sft_texts = UNLEARN_FORGET[:2], UNLEARN_RETAIN[:2], UNLEARN_RETAIN[4:6]
    cfg = resolve(PRESETS["lat"]["reference"], "lat", N_LAYERS, adversary_layers=layers, lora=False, lat_steps=6,
                  lat_eps=0.5)
    assert (cfg.adversary, cfg.lat_defender, cfg.adversary_lr) == ("targeted", "away", 5e-2)
    assert (cfg.lat_toward_coef, cfg.lat_sft_coef, cfg.adversary_away_coef) == (1.0, 4.0, 1.0)
    method = package_method(cfg, model, None, total_steps=3)
    assert method.loss_weights() == {"defender": {"toward": 1 / 6, "away": 1 / 6, "sft": 4 / 6},
                                     "adversary": {"toward": 0.5, "away": 0.5}}
    forget, retain = encode(tokenizer, forget_texts, cfg.max_length), encode(tokenizer, retain_texts, cfg.max_length)
    assert forget["input_ids"].shape[1] != retain["input_ids"].shape[1]  # the pairing pads / cuts the attack
    ours, metrics = method.loss(forget, retain, 0)
    coefs = ({"toward": 1, "away": 1}, {"toward": 1, "away": 1, "sft": 4})  # the WMDP notebook's
    args = (model, tokenizer, forget_texts, retain_texts)
    unmodified, _, _ = targeted_lat_loss(*args, sft_texts, layers, 0.5, 5e-2, 6, *coefs)
    theirs, adv_losses, adversaries = targeted_lat_loss(*args, retain_texts, layers, 0.5, 5e-2, 6, *coefs)
    walk([("unmodified", unmodified), ("sft on the retain batch", theirs)], ours, TARGETED_LAT_DEVIATIONS[tuple(layers)])
    assert metrics["adversary_start_nll"] == pytest.approx(adv_losses[0], rel=1e-6)
    assert metrics["adversary_nll"] == pytest.approx(adv_losses[-1], rel=1e-6)
    assert adv_losses[-1] < adv_losses[0]
    for adv in adversaries:  # the clip binds: every token's perturbation sits on the eps ball
        assert float(adv.attack.norm(dim=-1).max()) == pytest.approx(0.5, abs=1e-5)
    weight = model.model.layers[1].mlp.up_proj.weight
    torch.testing.assert_close(torch.autograd.grad(ours, weight)[0], torch.autograd.grad(theirs, weight)[0],
                               atol=1e-7, rtol=1e-5)


def test_lat_away_defender_without_toward_or_adversary_away_is_the_former_loss():
    """--lat-toward-coef 0 and --adversary-away-coef 0 leave the terms out: (away + sft x retain) / (1 + sft)."""
    from unlearn_lens.unlearning.losses import log_one_minus_p_loss, mean_token_nll

    trained, _ = tiny(noise=0.0)
    forget, retain = batch(0), batch(1, seq=8)
    cfg = resolve(PRESETS["lat"]["reference"], "lat", N_LAYERS, adversary_layers=[1], lora=False, lat_steps=2,
                  lat_toward_coef=0.0, adversary_away_coef=0.0)
    method = package_method(cfg, trained, None, total_steps=3)
    ours, metrics = method.loss(forget, retain, 0)
    assert "toward_loss" not in metrics and "adversary_away_loss" not in metrics
    attack = fit_attack(method.ctx, forget)
    logits, _ = forward(trained, ArchitectureAdapter(trained), forget, inject=attack.forget)
    away = log_one_minus_p_loss(logits, forget["input_ids"], forget["attention_mask"])
    retain_logits, _ = forward(trained, ArchitectureAdapter(trained), retain)
    sft = mean_token_nll(retain_logits, retain["input_ids"], retain["attention_mask"])
    assert float(ours) == pytest.approx(float((away + 4 * sft) / 5), rel=1e-6)


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
    405f6ab (before presets); the same run with the ``original`` preset's values logs the same.

    tolerance: ROUNDING (tests/float_path.py): the log is after optimiser steps, which amplify another
    CPU's rounding (eval_forget_nll moved by 2.4e-5 relative on an Intel Xeon and under
    ATEN_CPU_CAPABILITY=default); each value may move by 10x what three one-ulp perturbations of the
    model's weights move it on this machine, and by at least 1e-5 relative."""
    from pathlib import Path

    from conftest import write_unlearn_data
    from float_path import assert_tables_close, one_ulp_copy, read_table, spreads
    from unlearn_lens.testing import save_tiny_model
    from unlearn_lens.unlearning.trainer import run_unlearning

    model = save_tiny_model("gpt_neox", tmp_path / "m")
    data = str(write_unlearn_data(tmp_path / "d"))
    values = dict(PRESETS[method]["original"].values)
    values.update(steps=3, batch_size=2, max_length=16, device="cpu", lr=1e-3, eval_every=1, layer_id=1)
    if method == "cb_lat":
        values["target_layers"] = [1, 2]

    def train_log(weights: Path, out: str) -> list[list[str]]:
        run_unlearning(UnlearnConfig(str(weights), data, str(tmp_path / out), method, **values), progress=False)
        return read_table(tmp_path / out / "train_log.csv")

    got = train_log(model, "out")
    perturbed = [train_log(one_ulp_copy(model, tmp_path / f"m{seed}", seed), f"out{seed}") for seed in range(3)]
    want = read_table(Path(__file__).parent / "data" / "unlearn_golden" / f"{method}_train_log.csv")
    assert len(got) == len(want) == 4
    assert_tables_close(got, want, spreads(got, perturbed), method)


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
