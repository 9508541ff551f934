"""Prefix-aware constraints: a regular expression on the completion text as a token automaton, and a
rule against repeated token n-grams (:class:`NoRepeatRule`).

A :class:`RegexRule` tells, for every prefix z_1..z_t of an episode, which next tokens keep a full
match of the pattern reachable within the episode's remaining length, and whether the text so far
matches (so that stopping is allowed). Attached to :class:`gfnlm.sampling.Constraints` as its
``prefix_rule``, it is one action mask shared by the sampler, the scoring pass and the rewards: the
policy never spends a sample where c(Z) = 0, and log q stays exact (renormalised over the actions the
rule allows).

The regex is compiled by **interegular** (a pure-Python regex to finite-state-machine compiler used
by constrained-decoding libraries); each token's text is walked through its character automaton. We
first used outlines-core (its ``Index`` does the same walk in Rust), but version 0.2.14 drops the
transitions that leave an accepting state along a path of several tokens (``a(bb)?`` never produces
``abb``), which this module's brute-force test caught; a mask that forbids matching texts is a wrong
target, so we walk the tokens ourselves. A token whose bytes are not whole UTF-8 characters (half of a
multi-byte character) is never allowed under a pattern: such texts are outside the target.

The pattern must match the whole completion (the stop action is not part of it: with stop ".",
``[^e]+`` is a sentence without the letter e). Tokens are read as the bytes they stand for (GPT-2
byte-level tokenizers; SentencePiece's ``▁`` and ``<0xNN>`` tokens); special tokens and the stop ids are
never part of the text.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from .errors import DataError


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable stand-in character of each byte, inverted."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_HEX_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer) -> dict[int, bytes]:
    """The bytes each ordinary token id writes into the text (special tokens left out)."""
    special = set(tokenizer.all_special_ids)
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    byte_level = decoder is not None and "ByteLevel" in type(decoder).__name__
    table = _byte_decoder() if byte_level else None
    out = {}
    for text, i in tokenizer.get_vocab().items():
        if i in special:
            continue
        if table is not None:
            try:
                out[i] = bytes(table[c] for c in text)
            except KeyError:  # an added token outside the byte alphabet: its text as it is
                out[i] = text.encode()
        elif _HEX_BYTE.fullmatch(text):
            out[i] = bytes([int(_HEX_BYTE.fullmatch(text).group(1), 16)])
        else:
            out[i] = text.replace("\u2581", " ").encode()
    return out


def compile_pattern(pattern: str):
    """The pattern's character automaton (interegular's FSM), or a one-line :class:`DataError`."""
    import interegular

    try:
        return interegular.parse_pattern(pattern).to_fsm()
    except Exception as e:  # interegular's parse errors have no common base class
        raise DataError(f"regex {pattern!r} cannot be compiled ({type(e).__name__}): check the pattern") from None


def _or_all(values) -> int:
    out = 0
    for v in values:
        out |= v
    return out


class PrefixRule:
    """What every prefix rule shares: ``start``, ``advance(state, token)`` (None once dead) and
    ``accepting(state)`` give the states; :meth:`walk` and :meth:`matches` follow from them."""

    start: object

    def walk(self, tokens: list[int]) -> list:
        """The states after each prefix of ``tokens``: [len + 1] (the start first; None once dead)."""
        out = [self.start]
        for t in tokens:
            out.append(self.advance(out[-1], t))
        return out

    def matches(self, tokens: list[int]) -> bool:
        """Whether the whole completion ``tokens`` satisfies the rule."""
        return self.accepting(self.walk(list(tokens))[-1])


class RegexRule(PrefixRule):
    """``pattern`` as an action mask over ``constraints``' actions (see the module docstring).

    States are the states of the pattern's character automaton. ``allowed(state, remaining)`` is the
    bool [V] mask of the tokens that may be taken there with ``remaining`` actions left (those from
    which a full match is still reachable in time), ``accepting(state)`` whether the text so far
    matches, ``advance`` the next state. Token transitions are built once per reachable state, masks
    once per (state, remaining), and cached.

    Raises a one-line :class:`DataError` for a pattern that does not compile, one that no text of this
    vocabulary matches within ``max_new_tokens`` tokens, or one no first token can start.
    """

    def __init__(self, pattern: str, tokenizer, constraints):
        import interegular

        self.pattern = pattern
        self.max_new_tokens = constraints.max_new_tokens
        fsm = compile_pattern(pattern)
        self._fsm_map, self.start, self.final = fsm.map, fsm.initial, set(fsm.finals)
        alphabet = fsm.alphabet
        other = alphabet[interegular.fsm.anything_else]
        vocab_size = max(len(tokenizer), *constraints.stop_token_ids) + 1
        actions = constraints.token_mask(vocab_size, "cpu")[0]
        self._tokens = []  # (id, symbols of its characters): the actions whose bytes are whole characters
        for i, b in token_bytes(tokenizer).items():
            if i < len(actions) and actions[i] and b:
                try:
                    text = b.decode("utf-8")
                except UnicodeDecodeError:
                    continue
                self._tokens.append((i, tuple(alphabet[c] if c in alphabet else other for c in text)))
        self.trans: dict[int, dict[int, int]] = {}
        todo = [self.start]
        while todo:  # token transitions of every state reachable from the start
            st = todo.pop()
            if st in self.trans:
                continue
            self.trans[st] = self._token_transitions(st)
            todo += [n for n in set(self.trans[st].values()) if n not in self.trans]
        self.min_new_tokens = constraints.min_new_tokens
        self.lengths = self._match_lengths()
        if not self.lengths.get(self.start, 0) >> self.min_new_tokens:
            raise DataError(f"regex {pattern!r}: no completion of {self.min_new_tokens} to {self.max_new_tokens} tokens "
                            "that the policy may write matches it: check the pattern against the allowed tokens, or "
                            "change min_new_tokens / max_new_tokens")
        self._masks: dict = {}

    def _token_transitions(self, state: int) -> dict[int, int]:
        out = {}
        fsm = self._fsm_map
        for i, symbols in self._tokens:
            st = state
            for sym in symbols:
                st = fsm.get(st, {}).get(sym)
                if st is None:
                    break
            else:
                out[i] = st
        return out

    def _match_lengths(self) -> dict[int, int]:
        """For each state, a bitmask of the numbers of tokens k (0..max_new_tokens) after which a match
        can end: bit k of ``lengths[s]`` is set if some k tokens lead from s to a matching state."""
        full = (1 << (self.max_new_tokens + 1)) - 1
        nexts = {s: set(d.values()) for s, d in self.trans.items()}
        lengths = {s: int(s in self.final) for s in self.trans}
        for _ in range(self.max_new_tokens):
            lengths = {s: (int(s in self.final) | _or_all(lengths.get(n, 0) << 1 for n in nexts[s])) & full
                       for s in self.trans}
        return lengths

    def spec(self) -> dict:
        """What a checkpoint saves to rebuild the rule (:func:`rule_from_spec`)."""
        return {"regex": self.pattern}

    def accepting(self, state: int | None) -> bool:
        return state in self.final

    def advance(self, state: int | None, token: int) -> int | None:
        """The state after ``token``; None (dead) when the token leaves the pattern (only a
        teacher-forced episode the rule would not have produced gets there: its log q is -inf)."""
        return None if state is None else self.trans.get(state, {}).get(int(token))

    def allowed(self, state: int | None, remaining: int, vocab_size: int, device) -> Tensor:
        """Bool [vocab_size]: the tokens that may be taken in ``state`` with ``remaining`` actions left:
        those after which a match of ``min_new_tokens`` to ``max_new_tokens`` tokens in all stays
        reachable (so no state is ever left without an action or a stop)."""
        remaining = max(0, min(int(remaining), self.max_new_tokens))
        key = (state, remaining, vocab_size, str(device))
        if key not in self._masks:
            m = torch.zeros(vocab_size, dtype=torch.bool)
            taken = self.max_new_tokens - remaining  # actions so far; after this token, taken + 1
            lo = max(0, self.min_new_tokens - taken - 1)
            window = ((1 << remaining) - 1) >> lo << lo  # bits lo .. remaining - 1: more tokens after this one
            ids = [t for t, n in self.trans.get(state, {}).items()
                   if t < vocab_size and self.lengths.get(n, 0) & window]
            if ids:
                m[torch.tensor(ids)] = True
            self._masks[key] = m.to(device)
        return self._masks[key]


class NoRepeatRule(PrefixRule):
    """No token n-gram twice in the completion: c(Z) = 1 when no ``n`` consecutive tokens of Z occur
    twice in Z (the prompt is not part of it). The same interface as :class:`RegexRule`, so it is one
    action mask shared by the sampler, the scoring pass, the rewards, the ``generate`` baselines and SMC.

    Why: an LM scores a token repeated over and over ever more likely (it copies), so a target built
    from LM likelihoods can put its mass on such loops; measured on SmolLM2-135M, one token repeated 24
    times outranks every one of 8 sentences sampled for the same prompt under the contrastive target
    (README, "Contrastive posterior"). ``generate``'s ``no_repeat_ngram_size`` is the usual guard; this is
    its exact form as a constraint of the target, over the completion only.

    States are the tuples of the tokens so far (None once an n-gram repeats: only a teacher-forced
    episode the rule would not produce gets there). Every state that is not None may stop."""

    def __init__(self, n: int):
        if int(n) < 1:
            raise DataError(f"no_repeat_ngram_size {n}: give n >= 1 (or 0 for no such rule)")
        self.n = int(n)
        self.start: tuple = ()
        self._all: dict = {}

    def spec(self) -> dict:
        return {"no_repeat_ngram_size": self.n}

    def accepting(self, state) -> bool:
        return state is not None

    def banned(self, state: tuple) -> set[int]:
        """The tokens that would complete an n-gram that ``state`` already holds."""
        k = self.n - 1
        if len(state) < k:
            return set()
        tail = state[len(state) - k:] if k else ()
        return {state[i + k] for i in range(len(state) - k) if state[i:i + k] == tail}

    def advance(self, state, token: int):
        if state is None or int(token) in self.banned(state):
            return None
        return state + (int(token),)

    def allowed(self, state, remaining: int, vocab_size: int, device) -> Tensor:
        """Bool [vocab_size]: every token except those that would repeat an n-gram (none in a dead state).
        The stop is not a token here: every live state may stop."""
        key = (vocab_size, str(device))
        if key not in self._all:
            self._all[key] = torch.ones(vocab_size, dtype=torch.bool, device=device)
        if state is None:
            return torch.zeros(vocab_size, dtype=torch.bool, device=device)
        ban = [t for t in self.banned(state) if t < vocab_size]
        if not ban:
            return self._all[key]
        m = self._all[key].clone()
        m[torch.tensor(ban, device=device)] = False
        return m


def rule_from_spec(spec: dict, tokenizer, constraints):
    """The prefix rule a checkpoint saved (its ``spec()``; a regex as ``{"regex": pattern}``), or None
    for a spec that names no rule this module can rebuild."""
    if "regex" in spec:
        return RegexRule(str(spec["regex"]), tokenizer, constraints)
    if "no_repeat_ngram_size" in spec:
        return NoRepeatRule(int(spec["no_repeat_ngram_size"]))
    return None
