"""
One Tokenizer for the kinds of model this repo fine-tunes:
- sentencepiece `tokenizer.model` (LLaMA-2 and Meta's MTP checkpoints, and data/arith's own),
- tiktoken BPE files (LLaMA-3's `tokenizer.model`: text lines `base64token rank`), with
  LLaMA-3's pattern and its 256 special tokens, or a tiktoken encoding name ("cl100k_base")
  whose file is already in tiktoken's local cache (nothing is ever downloaded),
- Hugging Face `tokenizer.json` (the `tokenizers` package), for a Hugging Face directory that
  has no tokenizer.model; bos/eos/pad come from the `tokenizer_config.json` beside it.
The kind is detected from the file's content, never from its name: both of the first kinds are
called `tokenizer.model`. A directory stands for its tokenizer.model, else its tokenizer.json.

    tok = Tokenizer("data/arith/tokenizer.model")
    ids = tok.encode("Compute: 1 + 2\n", bos=True, eos=False)
    text = tok.decode(ids)
"""

import base64
import binascii
import hashlib
import io
import json
import os
import tempfile

import sentencepiece as spm

# LLaMA-3's pre-tokenizer pattern and special tokens, as in Meta's llama3/tokenizer.py
LLAMA3_PAT_STR = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501
LLAMA3_NUM_RESERVED_SPECIAL_TOKENS = 256
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",  # LLaMA-3.1 renamed this id to <|finetune_right_pad_id|>: our pad
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",  # end of turn
] + [f"<|reserved_special_token_{i}|>" for i in range(5, LLAMA3_NUM_RESERVED_SPECIAL_TOKENS - 5)]
LLAMA3_PAD_TOKEN = "<|reserved_special_token_2|>"

# a tokenizer.json without a tokenizer_config.json naming bos/eos: the first pair found in the vocab
HF_BOS_EOS_NAMES = [("<s>", "</s>"), ("<|begin_of_text|>", "<|end_of_text|>"), ("<|endoftext|>", "<|endoftext|>")]

# tiktoken's blob URLs and sha256 per encoding name (from tiktoken_ext/openai_public.py), so that
# we can check the local cache ourselves and never let tiktoken start a download
TIKTOKEN_BLOBS = {
    "gpt2": [
        ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
         "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
        ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
         "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    ],
    "r50k_base": [("https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken",
                   "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930")],
    "p50k_base": [("https://openaipublic.blob.core.windows.net/encodings/p50k_base.tiktoken",
                   "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069")],
    "p50k_edit": [("https://openaipublic.blob.core.windows.net/encodings/p50k_base.tiktoken",
                   "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069")],
    "cl100k_base": [("https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
                     "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7")],
    "o200k_base": [("https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
                    "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d")],
    "o200k_harmony": [("https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
                       "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d")],
}

# tiktoken's regex overflows its backtracking stack on very long runs of (non-)whitespace, so
# long texts are encoded in slices, as Meta's llama3 tokenizer does
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000


def tiktoken_cache_path(url):
    """Where tiktoken's read_file_cached looks for `url` (None when caching is disabled)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        cache_dir = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        cache_dir = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if cache_dir == "":
        return None
    return os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())


def parse_tiktoken_line(line):
    """`base64token rank` -> (bytes, int), or None when the line is not of that form."""
    parts = line.split()
    if len(parts) != 2 or not parts[1].isdigit():
        return None
    try:
        return base64.b64decode(parts[0], validate=True), int(parts[1])
    except (binascii.Error, ValueError):
        return None


def is_tiktoken_file(data):
    """True when the first (up to 3) non-empty lines of `data` (bytes) are `base64token rank`."""
    lines = data[:4096].split(b"\n")
    if len(data) > 4096:
        lines = lines[:-1]  # maybe cut mid-line
    lines = [line for line in lines if line.strip()][:3]
    return len(lines) > 0 and all(parse_tiktoken_line(line) is not None for line in lines)


def load_tiktoken_ranks(path, data):
    """Parse a tiktoken BPE file ourselves: tiktoken's loader copies local files into its cache."""
    ranks = {}
    for lineno, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        parsed = parse_tiktoken_line(line)
        if parsed is None:
            raise ValueError(f"{path}:{lineno}: not a tiktoken BPE line 'base64token rank': {line[:60]!r}")
        ranks[parsed[0]] = parsed[1]
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: tiktoken ranks are not exactly 0..{len(ranks) - 1} (duplicates or gaps)")
    return ranks


def split_whitespaces_or_nonwhitespaces(s, max_len):
    """Cut s so that no slice holds more than max_len consecutive (non-)whitespace chars (Meta's)."""
    current_len = 0
    current_is_space = s[0].isspace() if len(s) > 0 else False
    start = 0
    for i in range(len(s)):
        is_space = s[i].isspace()
        if current_is_space ^ is_space:
            current_len = 1
            current_is_space = is_space
        else:
            current_len += 1
            if current_len > max_len:
                yield s[start:i]
                start = i
                current_len = 1
    yield s[start:]


def tokenizer_file_in(directory):
    """A model directory's tokenizer file: tokenizer.model (sentencepiece or tiktoken), else
    tokenizer.json (Hugging Face), else None."""
    for name in ("tokenizer.model", "tokenizer.json"):
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return None


def hf_special_token(directory, name):
    """The `name` ('bos_token', 'eos_token', 'pad_token') string of a tokenizer.json's directory,
    from tokenizer_config.json or special_tokens_map.json (a string or {"content": ...}), or None."""
    for fname in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(directory, fname)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                value = json.load(f).get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if value:
                return value
    return None


class Tokenizer:
    """Encode/decode with bos/eos/pad ids; special-token strings inside text stay plain text."""

    def __init__(self, path):
        self.path = str(path)
        if os.path.isdir(self.path) and tokenizer_file_in(self.path):
            self.path = tokenizer_file_in(self.path)
        if os.path.isfile(self.path):
            with open(self.path, "rb") as f:
                data = f.read()
            if not data.strip():
                raise ValueError(f"tokenizer {self.path} is empty")
            if is_tiktoken_file(data):
                self._init_tiktoken_file(data)
            elif data.lstrip()[:1] == b"{":
                self._init_hf_tokenizers(data)
            else:
                self._init_sentencepiece(data)
        elif self.path in TIKTOKEN_BLOBS:
            self._init_tiktoken_name(self.path)
        elif os.path.exists(self.path):
            raise ValueError(f"tokenizer {self.path} is not a file (nor a directory with tokenizer.model or "
                             f"tokenizer.json)")
        else:
            raise FileNotFoundError(f"tokenizer {self.path}: no such file, and not a tiktoken encoding "
                                    f"name ({', '.join(TIKTOKEN_BLOBS)})")
        assert 0 <= self.bos_id < self.n_words and 0 <= self.eos_id < self.n_words
        assert 0 <= self.pad_id < self.n_words
        self.drop_ids = {self.bos_id, self.eos_id, self.pad_id}

    def _init_sentencepiece(self, data):
        self.kind = "sentencepiece"
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=data)
        except Exception:
            raise ValueError(f"tokenizer {self.path} is neither a sentencepiece model nor a tiktoken BPE "
                             f"file (lines 'base64token rank')") from None
        self.n_words = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"tokenizer {self.path}: sentencepiece model has no bos or eos piece "
                             f"(bos_id={self.bos_id}, eos_id={self.eos_id})")
        # Meta's models have no pad piece (pad_id -1): pad with eos, which the loss mask hides anyway
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    def _init_tiktoken_file(self, data):
        import tiktoken
        self.kind = "tiktoken"
        ranks = load_tiktoken_ranks(self.path, data)
        n_base = len(ranks)
        self.special_tokens = {token: n_base + i for i, token in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name=os.path.basename(self.path), pat_str=LLAMA3_PAT_STR,
                                     mergeable_ranks=ranks, special_tokens=self.special_tokens)
        self.n_words = self.enc.n_vocab  # n_base + 256, e.g. 128256 for LLaMA-3
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        # an id no text encodes to; LLaMA-3.1 uses this same id (128004) for right padding
        self.pad_id = self.special_tokens[LLAMA3_PAD_TOKEN]

    def _init_hf_tokenizers(self, data):
        from tokenizers import Tokenizer as HFTokenizer
        self.kind = "tokenizers"
        try:
            self.hf = HFTokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # noqa: BLE001  (invalid JSON or not a tokenizers file)
            raise ValueError(f"tokenizer {self.path} is not a Hugging Face tokenizer.json "
                             f"({' '.join(str(e).splitlines())[:200]})") from None
        self.hf.encode_special_tokens = True  # `<|...|>` inside text is plain text, as for the other kinds
        self.n_words = self.hf.get_vocab_size(with_added_tokens=True)
        directory = os.path.dirname(os.path.abspath(self.path))
        bos, eos = hf_special_token(directory, "bos_token"), hf_special_token(directory, "eos_token")
        if bos is None and eos is None:
            bos, eos = next(((b, e) for b, e in HF_BOS_EOS_NAMES if self.hf.token_to_id(b) is not None
                             and self.hf.token_to_id(e) is not None), (None, None))
        bos = bos or eos  # a model with one document separator (no bos of its own) uses it for both
        pad = hf_special_token(directory, "pad_token")

        def token_id(token):  # None for no token or one the vocab lacks
            return self.hf.token_to_id(token) if token else None

        self.bos_id, self.eos_id, pad_id = token_id(bos), token_id(eos), token_id(pad)
        if self.bos_id is None or self.eos_id is None:
            raise ValueError(f"tokenizer {self.path}: no bos/eos token (tokenizer_config.json bos_token={bos!r}, "
                             f"eos_token={eos!r}, and none of {HF_BOS_EOS_NAMES} in the vocab)")
        # no pad token (LLaMA's case): pad with eos, which the loss mask hides anyway
        self.pad_id = pad_id if pad_id is not None else self.eos_id

    def _init_tiktoken_name(self, name):
        import tiktoken
        for url, sha256 in TIKTOKEN_BLOBS[name]:
            cache = tiktoken_cache_path(url)
            if cache is None:
                raise FileNotFoundError(f"tiktoken encoding {name}: caching is disabled (TIKTOKEN_CACHE_DIR is "
                                        f"empty) and nothing is downloaded; pass a tiktoken BPE file instead")
            if not os.path.isfile(cache):
                raise FileNotFoundError(f"tiktoken encoding {name} is not available offline: put {url} at "
                                        f"{cache} (TIKTOKEN_CACHE_DIR), or pass a tiktoken BPE file instead")
            with open(cache, "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != sha256:
                    raise ValueError(f"tiktoken encoding {name}: cached file {cache} does not match the "
                                     f"sha256 of {url}")
        self.kind = "tiktoken"
        self.enc = tiktoken.get_encoding(name)  # reads the cache checked above, no network
        self.special_tokens = {t: self.enc.encode_single_token(t) for t in self.enc.special_tokens_set}
        self.n_words = self.enc.n_vocab
        # OpenAI encodings have one document separator: it serves as bos, eos and pad
        self.bos_id = self.eos_id = self.pad_id = self.enc.eot_token

    def encode(self, text, bos=False, eos=False):
        """text -> ids, with bos/eos ids added on request; `<|...|>` inside text is plain text."""
        assert isinstance(text, str)
        if self.kind == "sentencepiece":
            ids = self.sp.encode(text)
        elif self.kind == "tokenizers":
            ids = self.hf.encode(text, add_special_tokens=False).ids  # bos/eos only as asked for below
        else:
            ids = []
            for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
                for piece in split_whitespaces_or_nonwhitespaces(text[i:i + TIKTOKEN_MAX_ENCODE_CHARS],
                                                                 MAX_NO_WHITESPACES_CHARS):
                    ids.extend(self.enc.encode(piece, allowed_special=set(), disallowed_special=()))
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids):
        """ids (list, array or tensor) -> text, dropping bos/eos/pad."""
        ids = [int(i) for i in ids]
        ids = [i for i in ids if i not in self.drop_ids]
        if self.kind == "sentencepiece":
            return self.sp.decode(ids)
        if self.kind == "tokenizers":
            return self.hf.decode(ids, skip_special_tokens=False)
        return self.enc.decode(ids)

    def __repr__(self):
        return (f"Tokenizer({self.path!r}, kind={self.kind}, n_words={self.n_words}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})")


def train_sentencepiece(text, model_prefix, vocab_size, model_type="bpe", byte_fallback=True,
                        split_digits=True, user_defined_symbols=("\n",), max_sentence_length=1 << 16):
    """
    Train a sentencepiece model and write `{model_prefix}.model` (returned), byte-identical for
    the same text (one thread, no sampling or shuffling, no paths stored in the model).
    `text` is an iterable of strings (each may span several lines; newlines are kept as a piece)
    or a text file path (one sentence per line). Pieces are kept byte-exact (identity
    normalization, no dummy prefix, no whitespace folding) so that decode(encode(s)) == s;
    byte_fallback makes any text encodable (it costs 256 pieces); split_digits makes every digit
    its own piece. vocab_size is an upper bound on small data. Ids: unk 0, bos 1, eos 2, pad 3.
    """
    if isinstance(text, (str, os.PathLike)):
        with open(text, encoding="utf-8") as f:
            text = [line.rstrip("\n") for line in f]
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(text), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            character_coverage=1.0, byte_fallback=byte_fallback, split_digits=split_digits,
            user_defined_symbols=list(user_defined_symbols or []), normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False, hard_vocab_limit=False,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1, input_sentence_size=0,
            shuffle_input_sentence=False, max_sentence_length=max_sentence_length, minloglevel=2,
        )
    except RuntimeError as e:  # e.g. "Vocabulary size is smaller than required_chars. 300 vs 311."
        message = str(e).splitlines()[0]
        raise ValueError(f"training sentencepiece {model_prefix}.model failed: {message.split('] ')[-1]}") from None
    path = model_prefix + ".model"
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path
