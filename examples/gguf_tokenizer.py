"""Build a Hugging Face ``tokenizers.Tokenizer`` from GGUF tokenizer metadata.

Covers gpt2-style byte-level BPE vocabularies ("tokenizer.ggml.model" == "gpt2")
whose "tokenizer.ggml.pre" type uses the GPT-2 split regex in llama.cpp, with or
without llama.cpp's extra single-digit split (e.g. "smollm"), so that ids match
``llama_tokenize(..., parse_special=true)``.
"""

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# llama.cpp pre-types whose regex list is exactly the GPT-2 regex ...
_GPT2_PRE = {"gpt2", "mpt", "olmo", "jais"}
# ... and those that first split every \p{N} into its own piece (llama-vocab.cpp).
_DIGIT_PRE = {"starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"}

_CONTROL, _USER_DEFINED = 3, 4


def tokenizer_from_gguf(meta: dict) -> Tokenizer:
    """Return a tokenizer that encodes/decodes like llama.cpp for this GGUF metadata."""
    model = meta.get("tokenizer.ggml.model")
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
