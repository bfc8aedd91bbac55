"""Decoding loops over the LM with a KV cache: greedy, sampling, beam search.

All of them start from prompt embeddings (text with image features written in) and a
left-padded attention mask, so every row's next token is read from the last column.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import paddle
import paddle.nn.functional as F

from paddle_mm.lm import kv_decode
from paddle_mm.lm.adapter import run_language_model


def stop_set(eos_token_id) -> frozenset:
    """The ids that end a row: one id, several (Llama-3 stops on two), or none."""
    if eos_token_id is None:
        return frozenset()
    return frozenset([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)


def decode(lm, embeds, mask, max_new_tokens: int, eos_token_id, do_sample: bool = False,
           temperature: float = 1.0, top_p: float = 1.0, use_cache: bool = True,
           on_token: Callable[[int, int], bool | None] | None = None, fast_steps: bool = True,
           positions=None, prefill=None) -> list[list[int]]:
    """Greedy or sampled decoding; returns the new ids of each row, cut at eos.

    With the cache, the prompt and the new tokens run through kv_decode.PreallocatedDecoder
    where it covers the backbone (fast_steps=False: the backbone's own prompt pass and cached
    step throughout, what the tests compare it with).

    on_token(row, token id) is called as each kept token is chosen (streaming); when it returns
    True that row ends there (a batched server request that met its stop string or lost its
    client), and an exception it raises stops decoding and propagates.

    positions(start, length): the position ids of columns start..start+length, for an LM whose
    positions are not the mask's count (M-RoPE; its steps run in the backbone); None: the
    positions that skip padding. prefill(length): further inputs of a step over the prompt's
    columns, `length` in all (Qwen3-VL's DeepStack features); None: none.
    """
    embed_tokens = lm.get_input_embeddings()
    stops = stop_set(eos_token_id)
    b = embeds.shape[0]
    done = [False] * b
    out: list[list[int]] = [[] for _ in range(b)]
    cache = fast = None
    step_embeds = embeds
    for step in range(max_new_tokens):
        start = mask.shape[1] - step_embeds.shape[1]
        pos = None if positions is None else positions(start, step_embeds.shape[1])
        extra = prefill(step_embeds.shape[1]) if prefill is not None and start == 0 else {}
        if fast is not None:
            logits = fast.step(step_embeds)
        elif use_cache and step == 0 and fast_steps and positions is None and kv_decode.supports(lm):
            fast, logits = kv_decode.PreallocatedDecoder.prefill(lm, step_embeds, mask, max_new_tokens)
        elif use_cache:
            logits, cache = run_language_model(lm, step_embeds, mask, cache, use_cache=True, last_only=True,
                                               position_ids=pos, **extra)
        else:  # recompute the whole sequence each step: the reference the cache must match
            logits, _ = run_language_model(lm, step_embeds, mask, position_ids=pos, **extra)
        next_ids = pick(logits[:, -1].astype("float32"), do_sample, temperature, top_p)
        for i, t in enumerate(next_ids.tolist()):
            if not done[i]:
                done[i] = t in stops
                if not done[i]:
                    out[i].append(t)
                    if on_token is not None and on_token(i, t):
                        done[i] = True
        if all(done):
            break
        new_embeds = embed_tokens(next_ids.unsqueeze(-1))  # [B, 1, D]
        if fast is None:
            mask = paddle.concat([mask, paddle.ones([b, 1], dtype=mask.dtype)], axis=1)
        step_embeds = new_embeds if use_cache else paddle.concat([step_embeds, new_embeds], axis=1)
    return out


@dataclass
class Row:
    """One answer of a RunningBatch: on_token(token id) sees each kept token as it is chosen and
    ends the row by returning True; the row also ends at eos or after max_new_tokens tokens."""
    max_new_tokens: int
    on_token: Callable[[int], bool | None] | None = None
    tokens: list[int] = field(default_factory=list)


class RunningBatch:
    """Decoding in which rows join between steps and leave as they end (continuous batching): a
    server keeps its batch full instead of every batch lasting as long as its longest answer.
    One sampling setting for all rows; the backbones kv_decode covers (`supports`), whose
    PreallocatedDecoder rows can be dropped and merged. A row's tokens are those `decode` gives
    it in a batch of its own, up to the float rounding of a batch of another size."""

    def __init__(self, lm, eos_token_id, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0):
        self.lm, self.stops, self.sampling = lm, stop_set(eos_token_id), (do_sample, temperature, top_p)
        self.rows: list[Row] = []
        self._decoder = None
        self._next = None  # [B]: the token each row reads next

    @staticmethod
    def supports(lm) -> bool:
        return kv_decode.supports(lm)

    def add(self, embeds, mask, rows: list[Row]) -> list[Row]:
        """Prefill new rows (prompt embeddings [n, L, D], left-padded mask [n, L]) and choose their
        first tokens; returns the rows that ended there. The batch is unchanged if it raises."""
        fresh, logits = kv_decode.PreallocatedDecoder.prefill(self.lm, embeds, mask, max(r.max_new_tokens for r in rows))
        ids = pick(logits[:, -1].astype("float32"), *self.sampling)
        live, ended = self._emit(rows, ids)
        if live:
            if len(live) < len(rows):
                fresh.keep(live)
                ids = paddle.gather(ids, paddle.to_tensor(live, dtype="int64"))
            self._decoder = fresh if self._decoder is None else self._decoder.merged(fresh)
            self._next = ids if self._next is None else paddle.concat([self._next, ids])
            self.rows += [rows[i] for i in live]
        return ended

    def step(self) -> list[Row]:
        """One more token for every row; returns the rows that ended."""
        logits = self._decoder.step(self.lm.get_input_embeddings()(self._next.unsqueeze(-1)))
        ids = pick(logits[:, -1].astype("float32"), *self.sampling)
        live, ended = self._emit(self.rows, ids)
        if not live:
            self._decoder = self._next = None
        elif len(live) < len(self.rows):
            self._decoder.keep(live)
            ids = paddle.gather(ids, paddle.to_tensor(live, dtype="int64"))
        self.rows = [self.rows[i] for i in live]
        if live:
            self._next = ids
        return ended

    def _emit(self, rows: list[Row], ids) -> tuple[list[int], list[Row]]:
        """Each row's chosen token kept or not: (indices of the rows that go on, rows that ended)."""
        live, ended = [], []
        for i, (row, t) in enumerate(zip(rows, ids.tolist())):
            done = t in self.stops
            if not done:
                row.tokens.append(t)
                done = bool(row.on_token is not None and row.on_token(t)) or len(row.tokens) >= row.max_new_tokens
            if done:
                ended.append(row)
            else:
                live.append(i)
        return live, ended


def pick(logits, do_sample: bool, temperature: float, top_p: float):
    """Greedy, or temperature + nucleus sampling, over the last position's logits [B, V]."""
    if not do_sample:
        return paddle.argmax(logits, axis=-1)
    probs = F.softmax(logits / max(temperature, 1e-5), axis=-1)
    if top_p < 1.0:
        sorted_probs = paddle.sort(probs, axis=-1, descending=True)
        before = paddle.cumsum(sorted_probs, axis=-1) - sorted_probs
        # Keep the smallest set of tokens whose mass reaches top_p (the top token always).
        kept = paddle.where(before < top_p, sorted_probs, paddle.ones_like(sorted_probs))
        threshold = paddle.min(kept, axis=-1, keepdim=True)
        probs = paddle.where(probs >= threshold, probs, paddle.zeros_like(probs))
        probs = probs / probs.sum(axis=-1, keepdim=True)
    return paddle.multinomial(probs, num_samples=1).squeeze(-1)


def beam_search(lm, embeds, mask, max_new_tokens: int, eos_token_id, num_beams: int,
                length_penalty: float = 1.0) -> list[list[int]]:
    """Beam search per row; returns the best finished hypothesis of each row.

    Scores are summed log-probabilities divided by length**length_penalty, as in HF.
    """
    stops = stop_set(eos_token_id)
    b = embeds.shape[0]
    k = num_beams
    embed_tokens = lm.get_input_embeddings()
    embeds = paddle.repeat_interleave(embeds, k, axis=0)  # [B*K, L, D]
    mask = paddle.repeat_interleave(mask, k, axis=0)
    # Only the first beam of a row is live at the start, so the K beams do not all pick the same token.
    scores = paddle.to_tensor([0.0 if j == 0 else -1e9 for _ in range(b) for j in range(k)])
    seqs: list[list[int]] = [[] for _ in range(b * k)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
    logits, cache = run_language_model(lm, embeds, mask, None, use_cache=True, last_only=True)
    for step in range(max_new_tokens):
        logp = F.log_softmax(logits[:, -1].astype("float32"), axis=-1)  # [B*K, V]
        v = logp.shape[-1]
        total = (scores.unsqueeze(-1) + logp).reshape([b, k * v])
        top_scores, top_idx = paddle.topk(total, 2 * k, axis=-1)  # 2K so K non-eos candidates remain
        new_scores, beam_rows, next_ids, new_seqs = [], [], [], []
        for row in range(b):
            kept = 0
            for s, idx in zip(top_scores[row].tolist(), top_idx[row].tolist()):
                src = row * k + idx // v
                token = idx % v
                if token in stops or step == max_new_tokens - 1:
                    seq = seqs[src] + ([] if token in stops else [token])
                    finished[row].append((s / max(len(seq), 1) ** length_penalty, seq))
                    if token in stops:
                        continue
                if kept < k:
                    new_scores.append(s)
                    beam_rows.append(src)
                    next_ids.append(token)
                    new_seqs.append(seqs[src] + [token])
                    kept += 1
                if kept == k:
                    break
            while kept < k:  # every candidate ended: pad with dead beams
                new_scores.append(-1e9)
                beam_rows.append(row * k)
                next_ids.append(0)
                new_seqs.append(list(seqs[row * k]))
                kept += 1
        if step == max_new_tokens - 1 or all(len(f) >= k for f in finished):
            break
        seqs = new_seqs
        scores = paddle.to_tensor(new_scores)
        cache.reorder_cache(paddle.to_tensor(beam_rows))
        mask = paddle.concat([paddle.gather(mask, paddle.to_tensor(beam_rows)),
                              paddle.ones([b * k, 1], dtype=mask.dtype)], axis=1)
        logits, cache = run_language_model(lm, embed_tokens(paddle.to_tensor(next_ids).unsqueeze(-1)), mask,
                                           cache, use_cache=True, last_only=True)
    return [max(f, key=lambda x: x[0])[1] if f else [] for f in finished]
