"""Tokenizers rebuilt from GGUF tokenizer metadata, encoding as llama.cpp's
``llama_tokenize(text, add_special=true, parse_special=true)`` does.

* "tokenizer.ggml.model" == "gpt2" (SmolLM2, ...): byte-level BPE as a Hugging Face
  ``tokenizers.Tokenizer``, for the "tokenizer.ggml.pre" types that use the GPT-2 split regex in
  llama.cpp, with or without its extra single-digit split (e.g. "smollm").
* "llama" (SentencePiece vocabularies: Gemma, LLaMA 1/2, Mistral): ``SpmTokenizer``, llama.cpp's
  SPM algorithm in plain Python (scores, byte fallback, no merges list).

Both answer ``encode(text).ids``, ``decode(ids, skip_special_tokens=...)`` and ``token_to_id``.
"""

import heapq
from dataclasses import dataclass

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# llama.cpp pre-types whose regex list is exactly the GPT-2 regex ...
_GPT2_PRE = {"gpt2", "mpt", "olmo", "jais"}
# ... and those that first split every \p{N} into its own piece (llama-vocab.cpp).
_DIGIT_PRE = {"starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"}

# GGUF token types (llama.cpp's llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def tokenizer_from_gguf(meta: dict):
    """Return a tokenizer that encodes/decodes like llama.cpp for this GGUF metadata."""
    model = meta.get("tokenizer.ggml.model")
    if model == "llama":
        return SpmTokenizer(meta)
    pre = meta.get("tokenizer.ggml.pre", "default")
    if model != "gpt2" or pre not in _GPT2_PRE | _DIGIT_PRE:
        raise ValueError(f"unsupported GGUF tokenizer: model={model!r} pre={pre!r}")

    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, merges))

    # The GPT-2 regex llama.cpp uses is ByteLevel's built-in one.
    steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if pre in _DIGIT_PRE:
        steps.insert(0, pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"))
    # llama.cpp drops a byte with no token of its own but, unlike BPE here,
    # never merges its neighbours across the gap: split the piece there.
    missing = [c for c in pre_tokenizers.ByteLevel.alphabet() if c not in vocab]
    if missing:
        gap = "[" + "".join(f"\\x{{{ord(c):x}}}" for c in missing) + "]"
        steps.append(pre_tokenizers.Split(Regex(gap), behavior="removed"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()

    # llama.cpp splits these out before BPE (control ones when parsing specials).
    types = meta.get("tokenizer.ggml.token_type", [])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED])

    # BOS/EOS are added only where the metadata asks for it (as llama.cpp does).
    template, specials = ["$A"], []
    if meta.get("tokenizer.ggml.add_bos_token"):
        bos = meta["tokenizer.ggml.bos_token_id"]
        template.insert(0, tokens[bos])
        specials.append((tokens[bos], bos))
    if meta.get("tokenizer.ggml.add_eos_token"):
        eos = meta["tokenizer.ggml.eos_token_id"]
        template.append(tokens[eos])
        specials.append((tokens[eos], eos))
    if specials:
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join(template), special_tokens=specials)
    return tok


@dataclass
class Encoding:
    ids: list
    tokens: list


class SpmTokenizer:
    """llama.cpp's SentencePiece ("llama") tokenizer over a GGUF vocabulary.

    Encoding, as llama-vocab.cpp does it: (1) control, unknown and user-defined tokens are cut
    out of the raw text first, longest first (with ``parse_special``; user-defined ones always);
    (2) each remaining piece gets a leading space if ``tokenizer.ggml.add_space_prefix`` asks for
    it (at the start and after a special token), its spaces become "▁", and it is split into
    characters; (3) the adjacent pair whose concatenation is the vocabulary entry with the highest
    score is merged, repeatedly (ties: the leftmost pair); (4) a piece that is not a token (a
    character outside the vocabulary) becomes its UTF-8 bytes' ``<0xNN>`` tokens. BOS / EOS are
    added as ``add_bos_token`` / ``add_eos_token`` say.
    """

    def __init__(self, meta: dict):
        self.tokens = list(meta["tokenizer.ggml.tokens"])
        self.scores = list(meta["tokenizer.ggml.scores"])
        n = len(self.tokens)
        self.types = list(meta.get("tokenizer.ggml.token_type", [_NORMAL] * n))
        self.vocab = {t: i for i, t in enumerate(self.tokens)}  # a repeated text: the last id
        self.add_space_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
        self.bos = meta.get("tokenizer.ggml.bos_token_id") if meta.get(
            "tokenizer.ggml.add_bos_token", True) else None
        self.eos = meta.get("tokenizer.ggml.eos_token_id") if meta.get(
            "tokenizer.ggml.add_eos_token", False) else None
        specials = [i for i, ty in enumerate(self.types)
                    if ty in (_CONTROL, _UNKNOWN, _USER_DEFINED)]
        # llama.cpp cuts the longest first (ids break ties here; its sort leaves them unspecified)
        self._specials = sorted(specials, key=lambda i: (-len(self.tokens[i].encode()), i))
        self._bytes = [self.vocab.get(f"<0x{b:02X}>") for b in range(256)]

    def token_to_id(self, token: str):
        return self.vocab.get(token)

    def id_to_token(self, i: int) -> str:
        return self.tokens[i]

    def get_vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, add_special_tokens: bool = True, parse_special: bool = True):
        ids = [self.bos] if add_special_tokens and self.bos is not None else []
        prev_special = True
        for piece in self._split_specials(text, parse_special):
            if isinstance(piece, int):
                ids.append(piece)
                prev_special = True
                continue
            if self.add_space_prefix and prev_special:
                piece = " " + piece
            ids += self._spm(piece.replace(" ", "\u2581"))
            prev_special = False
        if add_special_tokens and self.eos is not None:
            ids.append(self.eos)
        return Encoding(ids, [self.tokens[i] for i in ids])

    def _split_specials(self, text, parse_special):
        """text as a list of raw strings and special token ids (llama.cpp's st_partition)."""
        parts = [text] if text else []
        for i in self._specials:
            if not parse_special and self.types[i] != _USER_DEFINED:
                continue
            t = self.tokens[i]
            if not t or not any(isinstance(p, str) and t in p for p in parts):
                continue
            out = []
            for p in parts:
                if isinstance(p, str) and t in p:
                    pieces = p.split(t)
                    for k, q in enumerate(pieces):
                        if k:
                            out.append(i)
                        if q:
                            out.append(q)
                else:
                    out.append(p)
            parts = out
        return parts

    def _spm(self, text):
        """Ids of one piece: greedy highest-score merges of adjacent symbols (characters first)."""
        start = list(range(len(text)))  # symbol i: text[start[i]:start[i] + size[i]]
        size = [1] * len(text)
        prev = [i - 1 for i in range(len(text))]
        nxt = [i + 1 if i + 1 < len(text) else -1 for i in range(len(text))]
        heap = []

        def bigram(left, right):
            if left < 0 or right < 0:
                return
            s = text[start[left]:start[right] + size[right]]
            i = self.vocab.get(s)
            if i is not None:
                heapq.heappush(heap, (-self.scores[i], left, right, len(s)))

        for i in range(1, len(text)):
            bigram(i - 1, i)
        while heap:
            _, left, right, n = heapq.heappop(heap)
            if size[left] == 0 or size[right] == 0 or size[left] + size[right] != n:
                continue  # stale: one side has been merged since
            size[left] += size[right]
            size[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            bigram(prev[left], left)
            bigram(left, nxt[left])
        ids = []
        i = 0 if text else -1
        while i >= 0:
            s = text[start[i]:start[i] + size[i]]
            t = self.vocab.get(s)
            if t is not None:
                ids.append(t)
            else:  # byte fallback
                ids += [self._bytes[b] for b in s.encode()]
            i = nxt[i]
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Pieces joined: "\u2581" as a space in normal tokens, <0xNN> tokens as bytes, control
        tokens as their text unless skipped; invalid UTF-8 as U+FFFD."""
        out = bytearray()
        for i in ids:
            ty, t = self.types[i], self.tokens[i]
            if ty == _BYTE:
                out.append(int(t[3:5], 16))
            elif ty == _NORMAL:
                out += t.replace("\u2581", " ").encode()
            elif ty == _USER_DEFINED or not skip_special_tokens:
                out += t.encode()
        return out.decode("utf-8", errors="replace")
