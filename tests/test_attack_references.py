"""The attacks against unmodified transcriptions of their references, with each remaining deviation measured.

Direction ablation: Lucki et al. 2024, ethz-spylab/unlearning-vs-safety
``src/orthogonalization/orthogonalization.py`` (``get_zscore``, the outlier filter in
``compute_noise_direction``, the "ground_truth" direction, ``get_direction_ablation_output_hook``
registered on every decoder layer). The transcriptions below keep the reference's code and only
swap its data loading for the texts given.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import scale_block_mlp, write_unlearn_data

torch = pytest.importorskip("torch")


# --- the reference, transcribed -----------------------------------------------------------------

def get_zscore(data):
    """Along the first axis, compute the z-score of the data"""
    return (data - torch.mean(data, axis=0)) / torch.std(data, axis=0)


def get_direction_ablation_output_hook(direction):
    """Taken from https://github.com/andyrdt/refusal_direction"""
    def hook_fn(module, input, output):
        nonlocal direction

        if isinstance(output, tuple):
            activation = output[0]
        else:
            activation = output

        direction = direction / (direction.norm(dim=-1, keepdim=True) + 1e-8)
        direction = direction.to(activation)
        activation -= (activation @ direction).unsqueeze(-1) * direction

        if isinstance(output, tuple):
            return (activation, *output[1:])
        else:
            return activation

    return hook_fn


def reference_activations(model, tokenizer, model_original, texts, layers, ignore_first_x_tokens):
    """``compute_activations``'s WMDP loop, one text at a time, on ``texts`` (every text kept)."""
    def get_hook(model, layer):
        def hook(_, __, output):
            model.layer_out[layer] = output
        return hook

    handles = []
    for m in (model, model_original):
        m.layer_out = {}
        handles += [m.model.layers[int(layer)].register_forward_hook(get_hook(m, int(layer))) for layer in layers]
    tokens_wmdp = []
    original = {i: torch.empty((0, model.config.hidden_size)) for i in layers}
    distorted = {i: torch.empty((0, model.config.hidden_size)) for i in layers}
    with torch.no_grad():
        for prompt in texts:
            tokens = tokenizer(prompt, return_tensors="pt")
            model(tokens.input_ids)
            model_original(tokens.input_ids)
            tokens_wmdp += tokens.input_ids[0, ignore_first_x_tokens:].tolist()  # ids, not decoded strings
            for layer in layers:
                out_o, out_d = model_original.layer_out[int(layer)], model.layer_out[int(layer)]
                out_o = out_o[0] if isinstance(out_o, tuple) else out_o
                out_d = out_d[0] if isinstance(out_d, tuple) else out_d
                original[layer] = torch.vstack((original[layer], out_o[0, ignore_first_x_tokens:, :].cpu().float()))
                distorted[layer] = torch.vstack((distorted[layer], out_d[0, ignore_first_x_tokens:, :].cpu().float()))
    for handle in handles:
        handle.remove()
    return {"original": original, "distorted": distorted}, tokens_wmdp


def reference_directions(activations, tokens, layers, n_tokens=1000):
    """``compute_noise_direction``: outliers over the first ``n_tokens`` (WMDP part), then the ground truth."""
    outliers = []
    for layer in layers:
        dist = torch.cdist(activations["original"][layer][:n_tokens], activations["original"][layer][:n_tokens], p=1)
        outlier_map = get_zscore(dist.mean(axis=0)) > 3  # 3 standard deviations away from the mean
        outliers_wmdp = np.array(tokens[:n_tokens])[outlier_map.numpy()]
        outliers.extend(list(set(outliers_wmdp)))
    outlier_list = np.array(outliers)
    wmdp_filter = np.array([x not in outlier_list for x in tokens], dtype=bool)
    directions = {}
    for layer in layers:
        original = activations["original"][layer][wmdp_filter]
        distorted = activations["distorted"][layer][wmdp_filter]
        directions[layer] = torch.mean(distorted, axis=0) - torch.mean(original, axis=0)
    return directions, set(outlier_list.tolist())


# --- direction ablation -------------------------------------------------------------------------

def test_outlier_rule_equals_the_reference():
    """Our ``outlier_ids`` and the reference's z-scored mean L1 distances find the same tokens."""
    from analyses.activations.attack_directions import outlier_ids

    rng = np.random.default_rng(0)
    states = [rng.normal(size=(300, 16)).astype(np.float32) for _ in range(3)]
    ids = rng.integers(5, 60, size=300)
    states[0][[7, 100]] *= 12.0  # two far states at layer 1, one at layer 3
    states[2][250] += 40.0
    ids[[7, 100, 250]] = [1, 2, 3]
    ours = set(outlier_ids(states, ids).tolist())
    activations = {"original": {i: torch.from_numpy(x) for i, x in enumerate(states)}}
    _, reference = reference_directions({**activations, "distorted": activations["original"]}, ids.tolist(),
                                        range(3))
    assert ours == reference and {1, 2, 3} <= ours


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    """A tiny Llama and a copy whose block-1 MLP is scaled, captured on the test data (float32)."""
    from test_attack import capture_forget

    from unlearn_lens.testing import save_tiny_model

    root = tmp_path_factory.mktemp("reference-ablation")
    base = save_tiny_model("llama", root / "base")
    modified = scale_block_mlp(base, root / "modified", factor=3.0)
    data = write_unlearn_data(root / "data")
    caches = {which: capture_forget(path, data, root / f"{which}.zarr") for which, path in
              (("base", base), ("modified", modified))}
    return {"base": base, "modified": modified, "data": data, "caches": caches}


def test_directions_and_per_layer_ablation_equal_the_reference(llama_pair, tmp_path):
    """Fitted on the same texts with the same skip, our per-layer directions and the reference's
    agree to float32 rounding; so do the logits of the per-layer ablation (our hooks against
    ``get_direction_ablation_output_hook`` on every decoder layer)."""
    from analyses.activations.attack_directions import compute_and_save, load_directions
    from unlearn_lens.attacks.ablation import ablated_per_layer, per_layer_bases
    from unlearn_lens.data import read_texts
    from unlearn_lens.loading import load_model

    texts = read_texts(llama_pair["data"], "forget")
    fitted = [0, 3, 5]
    directions = load_directions(compute_and_save(llama_pair["caches"]["base"], llama_pair["caches"]["modified"],
                                                  tmp_path, samples=fitted, skip=1))
    model, tokenizer = load_model(str(llama_pair["modified"]))
    original, _ = load_model(str(llama_pair["base"]))
    layers = list(range(model.config.num_hidden_layers))
    activations, tokens = reference_activations(model, tokenizer, original, [texts[i] for i in fitted], layers, 1)
    reference, outliers = reference_directions(activations, tokens, layers)
    assert set(directions["outlier_ids"].tolist()) == outliers
    assert int(directions["n_tokens"]) == len(activations["original"][0]) - sum(t in outliers for t in tokens)
    for layer in layers:  # decoder layer i writes our residual layer i + 1
        ours = directions["mean_diff"][layer + 1].astype(np.float64)
        theirs = reference[layer].double().numpy()
        # float32 forwards of O(1) states, batched with padding (capture) or one text at a time
        assert np.abs(ours - theirs).max() < 1e-5 * max(1.0, np.abs(theirs).max()), layer
    assert not directions["mean_diff"][:2].any() and np.linalg.norm(directions["mean_diff"][2]) > 1e-2

    ids = torch.tensor([tokenizer(texts[1])["input_ids"]])
    with torch.no_grad():
        unattacked = model(ids).logits
        with ablated_per_layer(model, per_layer_bases(directions, 1)):
            ours = model(ids).logits
        handles = [model.model.layers[layer].register_forward_hook(
            get_direction_ablation_output_hook(torch.from_numpy(directions["mean_diff"][layer + 1].copy())))
            for layer in layers]
        theirs = model(ids).logits
        for handle in handles:
            handle.remove()
    assert (ours - unattacked).abs().max() > 1e-3  # the ablation does something
    # measured deviation: the reference normalises by |d| + 1e-8 and projects in place in the
    # activation dtype; ours projects in float32: below 1e-5 on logits of size ~1 here
    assert (ours - theirs).abs().max() < 1e-5


# --- quantization ---------------------------------------------------------------------------------
#
# Zhang et al. 2024, zzwjames/FailureLLMUnlearning ``utils.py: load_model``: 4-bit is
# ``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True), torch_dtype=torch.bfloat16)``,
# 8-bit ``BitsAndBytesConfig(load_in_8bit=True)`` without a dtype.

def zhang_load_model(model_dir, quantize_4bit, quantize_8bit):
    """``load_model`` of the reference, its quantized branches (device_map "cpu" for "auto")."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quantize_4bit == 1:
        bnb_config = BitsAndBytesConfig(load_in_4bit=True)
        return AutoModelForCausalLM.from_pretrained(model_dir, device_map="cpu", quantization_config=bnb_config,
                                                    torch_dtype=torch.bfloat16)
    elif quantize_8bit == 1:
        bnb_config = BitsAndBytesConfig(load_in_8bit=True)
        return AutoModelForCausalLM.from_pretrained(model_dir, device_map="cpu", quantization_config=bnb_config)


@pytest.fixture(scope="module")
def bnb_model(tmp_path_factory):
    """A tiny Llama 64 wide: bitsandbytes' CPU 4-bit kernels need widths that its blocks of 64 divide."""
    pytest.importorskip("bitsandbytes")
    from unlearn_lens.testing import save_tiny_model

    return save_tiny_model("llama", tmp_path_factory.mktemp("bnb") / "model", hidden=64)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def test_bnb_4bit_equals_zhang_et_al_loader(bnb_model):
    """``bnb-fp4`` quantizes every block linear exactly as the reference's loader does (packed codes
    and block absmax equal); with the model held in bfloat16 as there, the logits are equal too.
    Measured deviation: the CPU attack's default float32 model (bfloat16 only inside the 4-bit
    weights) moves these logits by 0.003 to 0.006."""
    from unlearn_lens.attacks import quantization as Q
    from unlearn_lens.loading import load_model

    reference = zhang_load_model(str(bnb_model), 1, 0)
    ours, tokenizer = load_model(str(bnb_model), dtype="bfloat16")
    assert Q.quantize_bitsandbytes(ours, "bnb-fp4") == 3 * 7
    theirs = dict(reference.named_modules())
    for name, module in ours.named_modules():
        if type(module).__name__ == "Linear4bit":
            assert type(theirs[name]).__name__ == "Linear4bit", name
            assert torch.equal(module.weight.data, theirs[name].weight.data), name
            assert torch.equal(module.weight.quant_state.absmax, theirs[name].weight.quant_state.absmax), name
            assert (module.weight.quant_state.quant_type, module.weight.quant_state.blocksize) == ("fp4", 64)
    assert type(ours.lm_head).__name__ == type(reference.lm_head).__name__ == "Linear"  # the head stays
    ids = torch.tensor([tokenizer("Viruses replicate inside host cells using the host machinery.")["input_ids"]])
    assert torch.equal(_logits(ours, ids), _logits(reference, ids))
    float32, _ = load_model(str(bnb_model), dtype="float32")
    Q.quantize_bitsandbytes(float32, "bnb-fp4")
    assert 1e-3 < (_logits(float32, ids) - _logits(reference, ids)).abs().max() < 1e-2


def test_bnb_int8_equals_zhang_et_al_loader(bnb_model):
    """``bnb-int8``: the int8 codes and row scales equal the reference loader's (LLM.int8(), from float16)."""
    from unlearn_lens.attacks import quantization as Q
    from unlearn_lens.loading import load_model

    reference = zhang_load_model(str(bnb_model), 0, 1)
    ours, tokenizer = load_model(str(bnb_model), dtype="float32")
    assert Q.quantize_bitsandbytes(ours, "bnb-int8") == 3 * 7
    theirs = dict(reference.named_modules())
    checked = 0
    for name, module in ours.named_modules():
        if type(module).__name__ == "Linear8bitLt":
            assert torch.equal(module.weight.data, theirs[name].weight.data), name
            assert torch.equal(module.weight.SCB, theirs[name].weight.SCB), name
            checked += 1
    assert checked == 21
    ids = torch.tensor([tokenizer("Bacteria divide by binary fission.")["input_ids"]])
    # the same quantized weights, the rest of the model in float32 in both: measured 0 difference
    assert (_logits(ours, ids) - _logits(reference, ids)).abs().max() < 1e-4


def test_int4_against_torchaos_own_int4_config_measured():
    """torchao's ``Int4WeightOnlyConfig`` (group 128, the int4 setting's group) is asymmetric: a
    bfloat16 scale and zero point per group from tinygemm's qparams (``_choose_qparams_affine_tinygemm``
    / ``_quantize_affine_tinygemm``, called here as ``Int4TilePackedTo4dTensor.from_hp`` calls them;
    the kernels that would run it need CUDA). The attack's int4 is symmetric. Measured on a fixed
    matrix and update: the share of changed entries whose dequantized weight moves under each."""
    from torchao.quantization.quant_primitives import (MappingType, _choose_qparams_affine_tinygemm,
                                                       _dequantize_affine_tinygemm, _quantize_affine_tinygemm)

    from analyses.weights.quantization import dequantize, quantize_codes

    rng = np.random.default_rng(7)
    w_a = (rng.standard_normal((64, 512)) * 0.02).astype(np.float32)
    w_b = w_a + (rng.standard_normal(w_a.shape) * 0.02 * 0.05).astype(np.float32)
    block = (1, 128)

    def tinygemm(w):
        hp = torch.from_numpy(w).to(torch.bfloat16)
        scale, zero = _choose_qparams_affine_tinygemm(hp, mapping_type=MappingType.ASYMMETRIC, block_size=block,
                                                      target_dtype=torch.int32, quant_min=0, quant_max=15,
                                                      scale_dtype=hp.dtype, zero_point_dtype=hp.dtype)
        codes = _quantize_affine_tinygemm(hp, block, scale, zero, torch.int32, quant_min=0, quant_max=15)
        return _dequantize_affine_tinygemm(codes, block, scale, zero, torch.int32, 0, 15,
                                           output_dtype=torch.float32).numpy()

    def symmetric(w):
        codes, scales, _ = quantize_codes(w, "int4", "bfloat16")
        return dequantize(codes, scales, "int4")

    changed = w_a != w_b
    moved = {name: float((f(w_a) != f(w_b))[changed].mean()) for name, f in (("ours", symmetric),
                                                                             ("torchao_int4", tinygemm))}
    # measured: 0.755 of the changed entries move under the symmetric int4, 0.947 under the asymmetric
    # one (its bfloat16 scale and zero point follow each group's min and max, so they move more often)
    assert moved["ours"] == pytest.approx(0.7552, abs=2e-3)
    assert moved["torchao_int4"] == pytest.approx(0.9470, abs=2e-3)


# --- relearning -----------------------------------------------------------------------------------
#
# Lucki et al. 2024, ethz-spylab/unlearning-vs-safety ``src/finetuning/finetune.py``: PEFT LoRA
# (r 128, alpha 16, dropout 0, bias "none", the attention and MLP projections) trained by the HF
# Trainer with these TrainingArguments. Its SFTTrainer adds the chat formatting only.

LORA_RANK, LORA_ALPHA, LORA_DROPOUT = 128, 16, 0
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH_SIZE, GRAD_ACCUM_STEPS, EPOCHS, LR, WARMUP_RATIO, WEIGHT_DECAY = 1, 1, 3, 2e-4, 0.05, 0.01


def test_reference_preset_trains_as_lucki_et_al_trainer(tmp_path):
    """Fed the same texts in the same order, ``relearn_condition`` with the reference preset's
    settings and the reference's Trainer end with the same LoRA weights (float32 rounding): the
    optimiser, schedule, warm-up, clipping and adapters match. What remains is stated, not
    measurable here: the reference wraps each text in its chat template and samples its own order."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainingArguments

    from conftest import UNLEARN_FORGET, UNLEARN_RETAIN
    from unlearn_lens.attacks.relearning import PRESETS
    from unlearn_lens.relearn import batch_schedule, relearn_condition
    from unlearn_lens.testing import make_tiny_model

    texts = (UNLEARN_FORGET + UNLEARN_RETAIN)[:10]
    steps = EPOCHS * len(texts) // BATCH_SIZE
    preset = PRESETS["reference"]
    assert (preset["lora_r"], preset["lora_alpha"], preset["lora_dropout"], preset["options"]["relearn_lr"],
            preset["weight_decay"], preset["warmup_ratio"], preset["epochs"], preset["options"]["relearn_batch_size"]) \
        == (LORA_RANK, LORA_ALPHA, LORA_DROPOUT, LR, WEIGHT_DECAY, WARMUP_RATIO, EPOCHS, BATCH_SIZE)

    ours, tokenizer = make_tiny_model("llama")
    relearn_condition(ours, tokenizer, texts, steps=steps, lr=LR, batch_size=BATCH_SIZE, max_length=64, seed=0,
                      eval_every=steps, evaluate_fn=lambda model: {}, start_eval={}, lora=True, lora_r=LORA_RANK,
                      lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, weight_decay=WEIGHT_DECAY,
                      schedule="linear", warmup_steps=math.ceil(WARMUP_RATIO * steps))
    order = [batch[0] for batch in batch_schedule(texts, steps, BATCH_SIZE, 0)]

    theirs, _ = make_tiny_model("llama")
    torch.manual_seed(0)  # the same adapter initialisation as ours
    peft_config = LoraConfig(r=LORA_RANK, target_modules=LORA_TARGET_MODULES, lora_alpha=LORA_ALPHA,
                             lora_dropout=LORA_DROPOUT, bias="none")
    theirs = get_peft_model(theirs, peft_config)

    class InOrder(Trainer):  # our order, laid out as one pass over the 30 steps' texts
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    dataset = [{"input_ids": tokenizer(text)["input_ids"]} for text in order]

    def collate(features):
        ids = torch.tensor([f["input_ids"] for f in features])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    # warmup_ratio=WARMUP_RATIO in the reference's transformers; transformers 5 takes a ratio as warmup_steps < 1
    args = TrainingArguments(per_device_train_batch_size=BATCH_SIZE, gradient_accumulation_steps=GRAD_ACCUM_STEPS,
                             warmup_steps=WARMUP_RATIO, num_train_epochs=1, learning_rate=LR, logging_steps=1,
                             optim="adamw_torch", weight_decay=WEIGHT_DECAY, lr_scheduler_type="linear", seed=0,
                             output_dir=str(tmp_path), report_to=[], save_strategy="no", use_cpu=True)
    InOrder(model=theirs, args=args, train_dataset=dataset, data_collator=collate).train()

    ours_lora = {n.replace("base_model.model.", ""): p for n, p in ours.named_parameters() if "lora_" in n}
    theirs_lora = {n.replace("base_model.model.", ""): p for n, p in theirs.named_parameters() if "lora_" in n}
    assert ours_lora.keys() == theirs_lora.keys() and len(ours_lora) == 2 * 7 * 3
    moved = max(float((p.detach() - 0).abs().max()) for n, p in ours_lora.items() if "lora_B" in n)
    assert moved > 1e-4  # the adapters did train
    for name, p in ours_lora.items():
        assert torch.allclose(p.detach(), theirs_lora[name].detach(), atol=1e-6, rtol=1e-5), name
