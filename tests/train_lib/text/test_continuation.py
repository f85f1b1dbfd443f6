"""Token healing (post 9762) and the continuation measurements, on a small sentencepiece vocabulary and bytes.

Healing changes nothing when no other token extends the prompt's last token (and never for bytes); its first
token always begins with the removed text; the next-character probabilities equal an explicit enumeration over
unpadded forward passes in float64; random segmentations reach the training stream reproducibly.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import continuation as study_lib
from tests.train_lib.text.test_sentencepiece import corpus, small_tokenizer
from tests.train_lib.text.test_task import QUICK_OVERRIDES
from train_lib import config_lib, registry, state as state_lib
from train_lib.config_lib import ConfigError
from train_lib.text import continuation, decoding, tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("continuation")
    texts = corpus(600, seed=2)
    for split, part in (("train", texts[:500]), ("validation", texts[500:550]), ("test", texts[550:])):
        (root / f"{split}.jsonl").write_text("".join(json.dumps({"text": t, "label": "positive"},
                                                                ensure_ascii=False) + "\n" for t in part))
    small_tokenizer().save(str(root))
    return root


def make_task(data_dir, model="sentencepiece", **overrides):
    config = study_lib.get_config(f"{model},quick")
    config = config_lib.apply_overrides(config, {
        **QUICK_OVERRIDES, "data.corpus": "jsonl", "data.path": str(data_dir), "data.seq_len": 32,
        "tokenizer.path": "" if model == "bytes" else str(data_dir), "batch_size": 4, **overrides})
    config.lock()
    return registry.make_task(config)


def random_params(task, seed=0, scale=3.0):
    """Initial parameters with the embeddings scaled up, so that the predictions are far from uniform."""
    params = state_lib.unbox(jax.jit(task.init_params)(jax.random.PRNGKey(seed), task.batch_spec(1)))
    return jax.tree_util.tree_map_with_path(
        lambda p, v: v * scale if "embed" in state_lib.path_name(p) else v, params)


def test_healer_sets_are_the_tokens_that_extend_the_removed_text():
    tok = small_tokenizer()
    pieces = tok.token_bytes()
    healer = decoding.TokenHealer(pieces)
    for i, b in enumerate(pieces):
        if b:
            want = sorted(j for j, c in enumerate(pieces) if c and c.startswith(b))
            assert sorted(healer.extending(b).tolist()) == want and i in want
    prompt = [tok.cls_id, *tok.encode("我们喜欢这本书")]
    assert healer.heal(prompt) == (prompt[:-1], pieces[prompt[-1]])
    assert healer.heal([tok.cls_id]) == ([tok.cls_id], b"")
    mask = healer.allowed_mask([pieces[prompt[-1]], b""])
    assert mask[1].all() and set(np.flatnonzero(mask[0])) == set(healer.extending(pieces[prompt[-1]]).tolist())
    byte_healer = decoding.TokenHealer(tokenizer_lib.ByteTokenizer().token_bytes())
    assert all(byte_healer.extending(bytes([b])).tolist() == [b] for b in range(256))
    with pytest.raises(NotImplementedError, match="token_bytes"):
        tokenizer_lib.WordPieceTokenizer.from_vocab(list(tokenizer_lib.SPECIAL_TOKENS) + ["a"]).token_bytes()


def _greedy(task, params, prompts, *, heal, steps):
    tok = task.tokenizer
    healer = decoding.TokenHealer(tok.token_bytes())
    rows, removed = zip(*[healer.heal(p) for p in prompts]) if heal else (prompts, [b""] * len(prompts))
    processor = decoding.allow_only_at_first_step(healer.allowed_mask(removed)) if heal else None
    prefix, valid = decoding.left_pad(rows, tok.pad_id)
    result = decoding.greedy(task.cached_lm(0), params, jnp.asarray(prefix), jnp.asarray(valid),
                             jnp.zeros(prefix.shape, jnp.int32), mask_kind="causal", target_segment=0,
                             max_new_tokens=steps, end_id=-1, logits_processor=processor)
    return np.asarray(result.tokens), removed


def test_healing_changes_nothing_when_no_other_token_extends_the_last_one(data_dir):
    task = make_task(data_dir)
    params = random_params(task)
    tok = task.tokenizer
    healer = decoding.TokenHealer(tok.token_bytes())
    prompts = []
    for text in corpus(200, seed=5):
        prompt = [tok.cls_id, *tok.encode(text)]
        if len(healer.extending(tok.token_bytes()[prompt[-1]])) == 1 and len(prompts) < 6:
            prompts.append(prompt)
    assert len(prompts) == 6
    naive, _ = _greedy(task, params, prompts, heal=False, steps=5)
    healed, _ = _greedy(task, params, prompts, heal=True, steps=6)
    assert (healed[:, 0] == [p[-1] for p in prompts]).all()  # the only token allowed: the removed one
    np.testing.assert_array_equal(healed[:, 1:], naive)
    byte_task = make_task(data_dir, "bytes")
    byte_params = random_params(byte_task)
    prompts = [[258, *t.encode("utf-8")] for t in corpus(4, seed=6)]
    naive, _ = _greedy(byte_task, byte_params, prompts, heal=False, steps=5)
    healed, _ = _greedy(byte_task, byte_params, prompts, heal=True, steps=6)
    np.testing.assert_array_equal(healed[:, 1:], naive)


def test_healed_first_token_always_begins_with_the_removed_text(data_dir):
    task = make_task(data_dir)
    params = random_params(task, scale=1.0)  # near-uniform: an unconstrained first token would rarely qualify
    tok = task.tokenizer
    pieces = tok.token_bytes()
    healer = decoding.TokenHealer(pieces)
    prompts = [[tok.cls_id, *tok.encode(t[:c])] for t in corpus(20, seed=7) for c in (2, 3, 5)]
    rows, removed = zip(*[healer.heal(p) for p in prompts])
    prefix, valid = decoding.left_pad(rows, tok.pad_id)
    result = decoding.sample(task.cached_lm(0), params, jnp.asarray(prefix), jnp.asarray(valid),
                             jnp.zeros(prefix.shape, jnp.int32), rng=jax.random.PRNGKey(0), mask_kind="causal",
                             target_segment=0, max_new_tokens=2, end_id=tok.sep_id, num_samples=8,
                             logits_processor=decoding.allow_only_at_first_step(healer.allowed_mask(removed)))
    first = np.asarray(result.tokens)[:, 0].reshape(len(prompts), 8)
    assert all(pieces[t] and pieces[t].startswith(r) for r, row in zip(removed, first) for t in row)
    assert len({int(t) for t in first.ravel()}) > 10  # sampled, not a constant


_FORWARD = {}


def _log_probs(task, params, prompt, width=32):
    """float64 log-probabilities after `prompt`, from a forward pass of it alone under the causal mask without a
    padding mask: the positions after it (filled with token 7) cannot reach it."""
    from models import masks
    if id(task) not in _FORWARD:
        _FORWARD[id(task)] = jax.jit(lambda p, t: task.model.logits(
            p["encoder"], t, attention_mask=masks.mask_from_tokens("causal", padding_mask=jnp.ones_like(t, bool))))
    tokens = np.full((1, width), 7, np.int32)
    tokens[0, :len(prompt)] = prompt
    logits = np.asarray(_FORWARD[id(task)](params, jnp.asarray(tokens))[0, len(prompt) - 1], np.float64)
    return logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()


def test_next_character_probabilities_equal_explicit_enumeration(data_dir):
    task = make_task(data_dir)
    params = random_params(task)
    tok = task.tokenizer
    pieces = tok.token_bytes()
    texts = corpus(3, seed=8)
    got = continuation.next_char_probabilities(task, params, texts, k=2, max_chars=6, batch_size=5)
    assert set(got) == {(i, c) for i, t in enumerate(texts) for c in continuation.cuts_of(t, k=2, max_chars=6)}
    for (i, c), value in got.items():
        char = texts[i][c].encode()
        prompt = [tok.cls_id, *tok.encode(texts[i][:c])]
        p = np.exp(_log_probs(task, params, prompt))
        naive = sum(p[t] for t, b in enumerate(pieces) if b and b.startswith(char))
        removed = pieces[prompt[-1]]
        q = np.exp(_log_probs(task, params, prompt[:-1]))
        allowed = [t for t, b in enumerate(pieces) if b and b.startswith(removed)]
        healed = sum(q[t] * (naive if t == prompt[-1] else float(pieces[t].startswith(removed + char)))
                     for t in allowed) / sum(q[t] for t in allowed)
        np.testing.assert_allclose([value["naive"], value["healed"]], [naive, healed], rtol=2e-4, atol=1e-7)
    byte_task = make_task(data_dir, "bytes")
    byte_params = random_params(byte_task)
    got = continuation.next_char_probabilities(byte_task, byte_params, texts, k=2, max_chars=6, batch_size=2)
    for (i, c), value in got.items():  # the chain rule over the character's bytes, one pass per byte
        prompt = [258, *texts[i][:c].encode()]
        want = 1.0
        for b in texts[i][c].encode():
            want *= np.exp(_log_probs(byte_task, byte_params, prompt)[b])
            prompt.append(b)
        np.testing.assert_allclose(value["naive"], want, rtol=2e-4)


@pytest.mark.parametrize("model,heal", [("sentencepiece", False), ("sentencepiece", True), ("bytes", False)])
def test_greedy_matches_recognise_the_models_own_continuation(data_dir, model, heal):
    """A text made of a prompt and the model's own unpadded greedy continuation must count as a match at that
    cut, and another text must not; rows of different lengths share a batch (left padding)."""
    task = make_task(data_dir, model)
    params = random_params(task)
    if model == "bytes":  # a random byte model writes invalid UTF-8; keep it to ASCII so there are characters
        bias = params["encoder"]["mlm_head"]["output_bias"]
        params["encoder"]["mlm_head"]["output_bias"] = bias.at[128:].set(-1e4)
    tok = task.tokenizer
    pieces = tok.token_bytes()
    k = 3
    texts = []
    for prompt_text in ["我们喜欢这", "价格很好有", "好书", "网站有兴趣可"]:
        generated, removed = _greedy(task, params, [[tok.cls_id, *tok.encode(prompt_text)]], heal=heal,
                                     steps=continuation.max_new_tokens(tok, k, heal))
        continued = b"".join(pieces[t] or b"" for t in generated[0])[len(removed[0]):].decode("utf-8", "replace")
        texts.append(prompt_text + continued[:k])
    got = continuation.greedy_matches(task, params, texts, k=k, max_chars=8, batch_size=3, heal=heal)
    checked = 0
    for i, prompt_text in enumerate(["我们喜欢这", "价格很好有", "好书", "网站有兴趣可"]):
        if len(texts[i]) == len(prompt_text) + k and "\ufffd" not in texts[i]:
            assert got[(i, len(prompt_text))], (texts[i], i)
            checked += 1
    assert checked >= 2, texts  # the check above ran: the model wrote k whole characters
    assert not all(got.values())  # other cuts of these texts are not all the model's own continuation


def test_evaluate_rows_split_aligned_and_mid_token_cuts(data_dir):
    task = make_task(data_dir)
    texts = continuation.eligible_texts(task, "test", k=2, max_texts=4)
    assert len(texts) == 4
    rows = continuation.evaluate(task, random_params(task), texts, k=2, max_chars=6, batch_size=8)
    by = {(r["method"], r["cuts"]): r for r in rows}
    assert set(by) == {(m, c) for m in ("naive", "healed") for c in ("aligned", "mid-token", "all")}
    for m in ("naive", "healed"):
        assert by[(m, "aligned")]["n"] + by[(m, "mid-token")]["n"] == by[(m, "all")]["n"]
        for c in ("aligned", "all"):  # getting two characters right gets the first right
            assert 0 <= by[(m, c)]["exact_2"] <= by[(m, c)]["exact_1"] <= 1 and 0 < by[(m, c)]["p_next"] <= 1
    byte_task = make_task(data_dir, "bytes")
    byte_params = random_params(byte_task)
    rows = continuation.evaluate(byte_task, byte_params, texts, k=2, max_chars=6, batch_size=8)
    assert [(r["method"], r["cuts"]) for r in rows] == [("naive", "aligned"), ("naive", "all")]
    split = continuation.evaluate(byte_task, byte_params, texts, k=2, max_chars=6, batch_size=8,
                                  boundaries=task.tokenizer)  # the byte model's cuts by the vocabulary's words
    assert [(r["method"], r["cuts"], r["n"]) for r in split] == [
        ("naive", "aligned", by[("naive", "aligned")]["n"]), ("naive", "mid-token", by[("naive", "mid-token")]["n"]),
        ("naive", "all", rows[1]["n"])]
    assert split[2]["p_next"] == pytest.approx(rows[1]["p_next"])


def test_sampled_segmentations_reach_the_training_stream_reproducibly(data_dir):
    task = make_task(data_dir, "sampled", **{"tokenizer.sampling_alpha": 0.1})
    tok = task.tokenizer

    def first_batches(n):
        train, _, info = task.datasets((0, task.batch_size))
        assert info["sampling_alpha"] == 0.1
        it = iter(train)
        return [next(it)["tokens"] for _ in range(n)]
    a, b = first_batches(130), first_batches(130)  # 500 records / batch 4: epoch 2 starts at batch 125
    assert all((x == y).all() for x, y in zip(a, b))  # (seed, index) → the same segmentation, as on a resume
    records = {t for t in corpus(600, seed=2)[:500]}
    sampled = 0
    for tokens in a:
        for row in tokens:
            ids = [int(t) for t in row if t not in (tok.pad_id, tok.cls_id, tok.sep_id)]
            text = tok.decode(ids)
            assert text in records  # a segmentation of a training text, never another text
            sampled += ids != tok.encode(text)
    assert sampled >= 5, sampled  # some examples are not the most likely segmentation
    # the segmentation depends on the stream index, not on the record: epochs differ
    from train_lib.text import conditional
    train, _, _ = task.datasets((0, task.batch_size))
    examples = conditional._Encoded(conditional.ConditionalLMTask.records(task, "train"), task, {"positive": 0})
    draws = {tuple(conditional._sampled(examples, task.seed, index, 3)["tokens"]) for index in range(0, 20000, 500)}
    assert len(draws) > 1
    deterministic = make_task(data_dir, "sentencepiece")
    train, _, _ = deterministic.datasets((0, task.batch_size))
    for tokens in [next(iter(train))["tokens"]]:
        for row in tokens:
            ids = [int(t) for t in row if t not in (tok.pad_id, tok.cls_id, tok.sep_id)]
            assert ids == tok.encode(tok.decode(ids))


@pytest.mark.parametrize("overrides,match", [
    ({"tokenizer.sampling_alpha": -0.1}, "sampling_alpha' must be >= 0"),
    ({"tokenizer.kind": "bytes", "tokenizer.path": "", "tokenizer.sampling_alpha": 0.1}, "samples sentencepiece"),
])
def test_bad_sampling_settings_are_config_errors(data_dir, overrides, match):
    with pytest.raises(ConfigError, match=match):
        make_task(data_dir, **overrides)


def test_sampling_is_refused_by_tasks_that_ignore_it(data_dir):
    from experiments import title_generation
    config = config_lib.apply_overrides(title_generation.get_config("quick"), {
        "tokenizer.kind": "sentencepiece", "tokenizer.path": str(data_dir), "tokenizer.sampling_alpha": 0.1,
        "init_from": ""})
    with pytest.raises(ConfigError, match="read by task 'conditional_lm' only"):
        registry.make_task(config)


@pytest.mark.slow
def test_quick_study_writes_the_table(tmp_path):
    study = study_lib.quick_study()
    study.workdir = str(tmp_path)
    text = study_lib.run(study)
    assert "| sentencepiece | healed | mid-token |" in text and "| bytes | naive | aligned |" in text
    results = json.loads((tmp_path / "results.json").read_text())
    assert {r["model"] for r in results["rows"]} == set(study_lib.MODELS)
    from tests.train_lib.conftest import run_cli
    out = run_cli([f"--workdir={tmp_path / 'sentencepiece'}", "--prompt=这本书的内", "--prompt=质量很",
                   "--max_new_tokens=3"], module="train_lib.text.continuation", devices=1)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("  naive:  这本书的内|") == 1 and out.stdout.count("  healed: 质量很|") == 1
