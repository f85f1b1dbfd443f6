"""Continuing a prompt cut at any character: a large vocabulary's gap and token healing (post 9762).

  python -m train_lib.text.continuation --workdir=DIR --split=test --max_texts=300 --k=4
  python -m train_lib.text.continuation --workdir=DIR --prompt="这本书的内" --prompt="质量很"   # continue, both ways

Su, "大词表语言模型在续写任务上的一个问题及对策" (https://kexue.fm/archives/9762): a language model whose tokenizer
merges words and phrases into single tokens sees, in training, a text's most likely segmentation only; a prompt
cut inside such a token ends on a token that rarely ends a text there, so the continuation starts badly. The
byte-level model has no such gap (every cut is a token boundary). The remedies are token healing
(`train_lib.text.decoding.TokenHealer`: back off the last token, let the first generated token be any token
that begins with the removed text) and training on random segmentations (`tokenizer.sampling_alpha`).

Every held-out text of a 'conditional_lm' workdir (condition 'none': a plain causal LM over `[CLS] text [SEP]`)
whose characters all occur in the train split is cut after each of its first `max_chars` characters (leaving at
least k after the cut); per cut, two numbers, by method and by whether the cut is a boundary of the full text's
most likely segmentation ('aligned') or falls inside a token ('mid-token'):

- p_next: the probability of the true next character. Bytes: the product of its bytes' probabilities, teacher
  forced. Sentencepiece (whose pieces are whole characters): the probability that the next token begins with
  it; healed: that the first token begins with removed text + character, plus the removed token's probability
  times the naive prediction after it, over the probability of all the tokens the healed first step allows.
- exact_1, exact_k: whether greedy decoding's first character, and its first k characters (after the removed
  text, healed), are the text's next ones.
"""
from __future__ import annotations

import json
import math
import pathlib
import sys
import time

from absl import flags

from train_lib import cli
from train_lib.config_lib import ConfigError

COMMAND = "train_lib.text.continuation"
SPLITS = ("validation", "test")


def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Training workdir of a 'conditional_lm' run with condition 'none'.")
    flags.DEFINE_string("split", "test", f"One of {', '.join(SPLITS)}.")
    flags.DEFINE_integer("max_texts", 300, "Use the first N eligible texts of the split (0 = all).")
    flags.DEFINE_integer("max_chars", 48, "Cut after each of the first N characters of a text.")
    flags.DEFINE_integer("k", 4, "Characters of greedy continuation compared with the text.")
    flags.DEFINE_integer("batch_size", 128, "Prompts per model call.")
    flags.DEFINE_string("output", None, "Also write the rows as JSON to this file.")
    flags.DEFINE_bool("use_ema", True, "Use the EMA parameters when the run kept them.")
    flags.DEFINE_multi_string("prompt", None, "Instead of measuring: print each prompt's greedy continuation, naive "
                              "and token-healed (repeat the flag for several prompts).")
    flags.DEFINE_integer("max_new_tokens", 32, "With --prompt: tokens to generate.")
    flags.DEFINE_string("boundaries_from", None, "Split the cuts into aligned / mid-token by this tokenizer (a "
                        "workdir's tokenizer/ directory or a .model) instead of the model's own.")


def eligible_texts(task, split: str, *, k: int, max_texts: int) -> list[str]:
    """The split's texts longer than k whose characters all occur in the train split (the same texts for every
    tokenizer: none of them meets an unknown character)."""
    from train_lib.text import data as data_lib

    known = set("".join(data_lib.training_texts(task.data_settings, ("text",))[0]))
    texts = [r["text"] for r in data_lib.load_records(task.data_settings, split, ("text",))]
    texts = [t for t in texts if len(t) > k and set(t) <= known]
    return texts[:max_texts] if max_texts > 0 else texts


def cuts_of(text: str, *, k: int, max_chars: int) -> range:
    return range(1, min(len(text) - k, max_chars) + 1)


def heals(tokenizer) -> bool:
    """Whether healing can change anything: not for bytes, where only the removed byte itself extends it."""
    return tokenizer.kind != "bytes"


def cut_prompts(tokenizer, texts, *, k: int, max_chars: int) -> list[tuple[int, int, list[int]]]:
    """(text index, cut, `[CLS]` + the ids of the text before the cut) for every cut of every text."""
    return [(i, c, [tokenizer.cls_id] + tokenizer.encode(text[:c])) for i, text in enumerate(texts)
            for c in cuts_of(text, k=k, max_chars=max_chars)]


def max_new_tokens(tokenizer, k: int, heal: bool) -> int:
    """Decoding steps that surely hold k characters: 4 bytes a character, or a piece each (+1: the healed token)."""
    return k * (4 if tokenizer.kind == "bytes" else 1) + (1 if heal else 0)


def longest_sequence(tokenizer, texts, *, k: int, max_chars: int) -> int:
    """The most positions a prompt ([CLS] included) and its greedy continuation take."""
    return max(1 + len(tokenizer.encode(text[:min(len(text) - k, max_chars)])) for text in texts) + max_new_tokens(
        tokenizer, k, heals(tokenizer))


def _boundaries(tokenizer, text: str) -> set[int]:
    _, starts = tokenizer.encode_with_starts(text)
    return set(starts) | {len(text)}


def _forward(task, what: str):
    """jit (params, tokens `[b, L]` right-padded, lengths `[b]`) → under the causal mask, gathered on the device
    (the full `[b, L, V]` log-probabilities never leave it): 'targets' → log p(token t+1 | ..t) `[b, L-1]`;
    'ends' → the log-probabilities after the whole row and after all but its last token, each `[b, V]`."""
    import jax
    import jax.numpy as jnp

    from models import masks as masks_lib

    def fn(params, tokens, lengths):
        valid = jnp.arange(tokens.shape[1])[None] < lengths[:, None]
        mask = masks_lib.mask_from_tokens("causal", padding_mask=valid)
        logits = task.model.logits(params["encoder"], tokens, attention_mask=mask)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        if what == "targets":
            return jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
        rows = jnp.arange(tokens.shape[0])
        return logp[rows, lengths - 1], logp[rows, jnp.maximum(lengths - 2, 0)]

    return jax.jit(fn)


def _right_pad(rows, pad_id: int, multiple: int = 16):
    import numpy as np

    width = -(-max(map(len, rows)) // multiple) * multiple  # a few shapes, a few compilations
    out = np.full((len(rows), width), pad_id, np.int32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out, np.asarray([len(r) for r in rows], np.int32)


def next_char_probabilities(task, params, texts, *, k: int, max_chars: int, batch_size: int):
    """{(text index, cut): {'naive': p, 'healed': p}} (bytes: 'naive' only; healing changes nothing there)."""
    import jax
    import numpy as np

    from train_lib.text import decoding

    tok = task.tokenizer
    out = {}
    if tok.kind == "bytes":  # one teacher-forced pass per text gives every cut
        forward = _forward(task, "targets")
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            rows = [[tok.cls_id] + tok.encode(t[:max_chars + 1]) for t in chunk]
            tokens, lengths = _right_pad(rows, tok.pad_id)
            targets = np.asarray(jax.device_get(forward(params, tokens, lengths)), np.float64)
            for j, text in enumerate(chunk):
                target = targets[j]  # log p(byte t+1 | ..t)
                byte_at = np.cumsum([0] + [len(ch.encode("utf-8")) for ch in text[:max_chars + 1]])
                for c in cuts_of(text, k=k, max_chars=max_chars):
                    out[(start + j, c)] = {"naive": float(np.exp(target[byte_at[c]:byte_at[c + 1]].sum()))}
        return out
    if tok.kind != "sentencepiece":
        raise ConfigError(f"{COMMAND}: tokenizer kind {tok.kind!r}; this measures 'bytes' and 'sentencepiece' models")
    healer = decoding.TokenHealer(tok.token_bytes())
    forward = _forward(task, "ends")
    prompts = cut_prompts(tok, texts, k=k, max_chars=max_chars)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        tokens, lengths = _right_pad([p for _, _, p in chunk], tok.pad_id)
        after_all, after_prefix = (np.asarray(x, np.float64) for x in jax.device_get(forward(params, tokens, lengths)))
        for j, (i, c, prompt) in enumerate(chunk):
            char = texts[i][c].encode("utf-8")
            p_last = np.exp(after_all[j])  # after the whole prompt
            naive = float(p_last[healer.extending(char)].sum())
            prefix, removed = healer.heal(prompt)
            if not removed:
                out[(i, c)] = {"naive": naive, "healed": naive}
                continue
            p_prev = np.exp(after_prefix[j])  # after the prompt without its last token
            allowed = p_prev[healer.extending(removed)].sum()
            longer = p_prev[healer.extending(removed + char)].sum()
            healed = (longer + p_prev[prompt[-1]] * naive) / allowed
            out[(i, c)] = {"naive": naive, "healed": float(healed)}
    return out


def continue_prompts(task, params, prompts: list[list[int]], *, max_new: int, heal: bool, batch_size: int
                     ) -> list[str]:
    """The greedy continuation of each prompt (token ids, [CLS] first) as text: with `heal`, the prompt's last
    token is backed off and the text after the removed text is returned. Rows are padded to `batch_size` and
    the prefix width to a multiple of 16, so a long evaluation compiles a few programs only."""
    import jax.numpy as jnp
    import numpy as np

    from train_lib.text import decoding

    tok = task.tokenizer
    token_bytes = tok.token_bytes()
    healer = decoding.TokenHealer(token_bytes) if heal else None
    lm = task.cached_lm(0)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        if heal:
            healed = [healer.heal(p) for p in chunk]
            rows, removed = [h[0] for h in healed], [h[1] for h in healed]
        else:
            rows, removed = list(chunk), [b""] * len(chunk)
        pad = batch_size - len(rows)  # one batch shape: one compilation
        rows, removed = rows + [rows[-1]] * pad, removed + [removed[-1]] * pad
        processor = decoding.allow_only_at_first_step(healer.allowed_mask(removed)) if heal else None
        prefix, valid = decoding.left_pad(rows, tok.pad_id)
        width = -(-prefix.shape[1] // 16) * 16
        prefix = np.pad(prefix, ((0, 0), (width - prefix.shape[1], 0)), constant_values=tok.pad_id)
        valid = np.pad(valid, ((0, 0), (width - valid.shape[1], 0)))
        prefix = jnp.asarray(prefix)
        result = decoding.greedy(lm, params, prefix, jnp.asarray(valid), jnp.zeros_like(prefix),
                                 mask_kind="causal", target_segment=0, max_new_tokens=max_new, end_id=tok.sep_id,
                                 logits_processor=processor)
        generated = np.asarray(result.tokens)
        for j in range(len(chunk)):
            ids = [int(t) for t in generated[j] if t != tok.sep_id]
            text_bytes = b"".join(token_bytes[t] or b"" for t in ids)
            if not text_bytes.startswith(removed[j]):
                raise AssertionError(f"token healing generated {text_bytes[:20]!r}, not starting with {removed[j]!r}")
            out.append(text_bytes[len(removed[j]):].decode("utf-8", errors="replace"))
    return out


def greedy_continuations(task, params, texts, *, k: int, max_chars: int, batch_size: int, heal: bool):
    """{(text index, cut): the first k characters greedy decoding writes (after the removed text, healed)}."""
    tok = task.tokenizer
    prompts = cut_prompts(tok, texts, k=k, max_chars=max_chars)
    written = continue_prompts(task, params, [p for _, _, p in prompts], max_new=max_new_tokens(tok, k, heal),
                               heal=heal, batch_size=batch_size)
    return {(i, c): text[:k] for (i, c, _), text in zip(prompts, written)}


def greedy_matches(task, params, texts, *, k: int, max_chars: int, batch_size: int, heal: bool):
    """{(text index, cut): whether the first k greedy characters (after the removed text) are the text's}."""
    got = greedy_continuations(task, params, texts, k=k, max_chars=max_chars, batch_size=batch_size, heal=heal)
    return {(i, c): text == texts[i][c:c + k] for (i, c), text in got.items()}


def evaluate(task, params, texts, *, k: int, max_chars: int, batch_size: int, boundaries=None) -> list[dict]:
    """Rows {'method', 'cuts', 'n', 'p_next', 'bits_next', 'exact_1', f'exact_{k}', 'seconds'} for 'aligned',
    'mid-token' and 'all' cuts; methods 'naive' and (sentencepiece) 'healed'. A cut is 'aligned' where the
    most likely segmentation by `boundaries` (a tokenizer; default the model's own) has a token boundary, so a
    byte model's cuts can be split by a large vocabulary's words."""
    start = time.perf_counter()
    kinds = {}
    for i, text in enumerate(texts):
        bounds = _boundaries(boundaries or task.tokenizer, text)
        for c in cuts_of(text, k=k, max_chars=max_chars):
            kinds[(i, c)] = "aligned" if c in bounds else "mid-token"
    probs = next_char_probabilities(task, params, texts, k=k, max_chars=max_chars, batch_size=batch_size)
    methods = ["naive"] + (["healed"] if heals(task.tokenizer) else [])
    written = {m: greedy_continuations(task, params, texts, k=k, max_chars=max_chars, batch_size=batch_size,
                                       heal=m == "healed") for m in methods}
    seconds = time.perf_counter() - start
    rows = []
    for method in methods:
        for which in ("aligned", "mid-token", "all"):
            keys = [key for key, kind in kinds.items() if which in ("all", kind)]
            if not keys:
                continue
            p = [max(probs[key][method], 1e-30) for key in keys]
            row = {"method": method, "cuts": which, "n": len(keys), "p_next": sum(p) / len(p),
                   "bits_next": -sum(math.log2(x) for x in p) / len(p)}
            for n in sorted({1, k}):
                row[f"exact_{n}"] = sum(written[method][(i, c)][:n] == texts[i][c:c + n] for i, c in keys) / len(keys)
            rows.append({**row, "seconds": seconds})
    return rows


def main(argv: list[str]) -> None:
    _define_flags()
    cli.parse_flags(argv)
    f = flags.FLAGS
    if not f.workdir:
        cli.fail("--workdir is required")
    if f.split not in SPLITS:
        cli.fail(f"--split must be one of {', '.join(SPLITS)}, got {f.split!r}")
    for name in ("k", "max_chars", "batch_size", "max_new_tokens"):
        if getattr(f, name) < 1:
            cli.fail(f"--{name} must be at least 1, got {getattr(f, name)}")

    def body():
        from train_lib import checkpointing
        from train_lib.text import evaluate as evaluate_lib

        run = checkpointing.restore_params(f.workdir, use_ema=f.use_ema, command=COMMAND)
        if run.config.task != "conditional_lm" or run.task.settings.condition != "none":
            raise ConfigError(f"--workdir {f.workdir!r} holds task {run.config.task!r}; {COMMAND} measures a plain "
                              "causal LM: task 'conditional_lm' with conditional.condition='none'")
        if f.prompt:
            tok = run.task.tokenizer
            prompts = [[tok.cls_id] + tok.encode(p) for p in f.prompt]
            naive = continue_prompts(run.task, run.params, prompts, max_new=f.max_new_tokens, heal=False,
                                     batch_size=len(prompts))
            healed = (continue_prompts(run.task, run.params, prompts, max_new=f.max_new_tokens + 1, heal=True,
                                       batch_size=len(prompts)) if heals(tok) else naive)
            for text, a, b in zip(f.prompt, naive, healed):
                print(f"{text!r}\n  naive:  {text}|{a}\n  healed: {text}|{b}")
            return
        texts = eligible_texts(run.task, f.split, k=f.k, max_texts=f.max_texts)
        if not texts:
            raise ConfigError(f"--split {f.split}: no text longer than --k={f.k} characters whose characters all "
                              "occur in the train split")
        longest = longest_sequence(run.task.tokenizer, texts, k=f.k, max_chars=f.max_chars)
        limit = run.task.model.max_positions
        if limit is not None and longest > limit:
            raise ConfigError(f"--max_chars={f.max_chars}: prompts and continuations reach {longest} tokens, beyond "
                              f"the model's {limit} positions; use a smaller --max_chars or --k")
        if longest > run.task.seq_len:
            print(f"# note: prompts and continuations reach {longest} tokens, beyond the training length "
                  f"{run.task.seq_len}")
        print(f"# checkpoint step {run.step} ({'EMA' if run.ema else 'raw'} parameters), {run.task.tokenizer.kind} "
              f"tokenizer ({run.task.tokenizer.vocab_size} tokens), {len(texts)} texts of split {f.split}")
        boundaries = None
        if f.boundaries_from:
            from train_lib.text import tokenizer as tokenizer_lib
            boundaries = tokenizer_lib.load_tokenizer(f.boundaries_from)
        rows = evaluate(run.task, run.params, texts, k=f.k, max_chars=f.max_chars, batch_size=f.batch_size,
                        boundaries=boundaries)
        print(evaluate_lib.format_table(rows))
        if f.output:
            pathlib.Path(f.output).write_text(json.dumps(rows, indent=2) + "\n")

    cli.run_guarded(body)


if __name__ == "__main__":
    main(sys.argv)
