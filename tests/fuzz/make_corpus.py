#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (tests/fuzz/corpus/<target>/) from the
repository's own data: the toy model's configs and tokenizer, configs/attributes. Run it
from anywhere; it overwrites the seeds it makes and leaves other files alone."""
import json
import os
import struct
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(ROOT, "tests", "fuzz", "corpus")
SEP = b"\n--8<--\n"  # fuzz_util.h: split()


def read(*path):
    with open(os.path.join(ROOT, *path), "rb") as f:
        return f.read()


def seed(target, name, data):
    os.makedirs(os.path.join(CORPUS, target), exist_ok=True)
    with open(os.path.join(CORPUS, target, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def safetensors(tensors, metadata=None):
    header, blob = {}, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(blob), len(blob) + len(data)]}
        blob += data
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob


# --- safetensors ----------------------------------------------------------------------
seed("safetensors", "two-tensors", safetensors(
    [("bias", "F32", [2], struct.pack("<2f", 1, 2)), ("weight", "F16", [2, 2], bytes(8))], {"format": "pt"}))
seed("safetensors", "empty", safetensors([]))
seed("safetensors", "scalar-and-zero-size", safetensors(
    [("step", "I64", [], struct.pack("<q", 7)), ("none", "BF16", [0, 3], b""), ("mask", "U8", [3], b"\1\0\1")]))
seed("safetensors", "checkpoint-keys", safetensors(
    [("model.diffusion_model.input_blocks.0.0.weight", "F16", [4, 4, 3, 3], bytes(288)),
     ("first_stage_model.decoder.conv_in.weight", "F16", [8, 4, 3, 3], bytes(576)),
     ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", "F16", [8, 4], bytes(64))]))

# --- config_json ----------------------------------------------------------------------
for part in ("unet", "vae", "text_encoder"):
    seed("config_json", part, read("models", "toy", part, "config.json"))
seed("config_json", "scheduler", read("models", "toy", "scheduler", "scheduler_config.json"))
seed("config_json", "model_index", read("models", "toy", "model_index.json"))
seed("config_json", "python-tokens", '{"lambda_min_clipped": -Infinity, "x": NaN, "layers": 2.0, '
     '"block_out_channels": [32, 64.0], "name": "a \\"NaN\\" string", "flag": true, "none": null}')

# --- clip_tokenizer: vocab.json, merges.txt, tokenizer_config.json, prompt -------------
vocab = {}
for s in "acdgot":
    vocab[s] = len(vocab)
for s in "acdgot":
    vocab[s + "</w>"] = len(vocab)
for s in ("ca", "do", "cat</w>", "dog", "dog</w>", "!", "<|startoftext|>", "<|endoftext|>"):
    vocab[s] = len(vocab)
merges = "#version: 0.2\nc a\nd o\nca t</w>\ndo g</w>\ndo g\n"
config = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
          "pad_token": "!", "model_max_length": 8}
seed("clip_tokenizer", "cat-dog", SEP.join([json.dumps(vocab).encode(), merges.encode(),
                                            json.dumps(config).encode(), b"a cat, a dog  DOG\xc3\xa9 <|endoftext|>"]))
config_obj = dict(config, pad_token={"content": "<|endoftext|>", "lstrip": False},
                  additional_special_tokens=["<|cat|>"], model_max_length=1e30)
seed("clip_tokenizer", "special-objects", SEP.join([json.dumps(dict(vocab, **{"<|cat|>": 20})).encode(), merges.encode(),
                                                    json.dumps(config_obj).encode(), "&amp; caf\u00e9 \u4e2d\u6587 <|cat|>dog".encode()]))

# --- sentencepiece: the toy model's pieces with a small normaliser; config; prompt ------
def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def fields(b):
    i, out = 0, []
    while i < len(b):
        key, i = read_varint(b, i)
        f, w = key >> 3, key & 7
        if w == 0:
            v, i = read_varint(b, i)
        elif w == 2:
            n, i = read_varint(b, i)
            v, i = b[i:i + n], i + n
        elif w == 5:
            v, i = b[i:i + 4], i + 4
        else:
            v, i = b[i:i + 8], i + 8
        out.append((f, w, v))
    return out


def read_varint(b, i):
    r = s = 0
    while True:
        c = b[i]
        i += 1
        r |= (c & 0x7F) << s
        s += 7
        if c < 0x80:
            return r, i


def encode(fs):
    out = b""
    for f, w, v in fs:
        out += varint(f << 3 | w)
        out += varint(v) if w == 0 else (varint(len(v)) + v if w == 2 else v)
    return out


def spm(model_type, byte_fallback=False, pieces=None):
    fs = fields(read("models", "toy", "tokenizer", "spiece.model"))
    kept = [x for x in fs if x[0] == 1][:pieces]
    trainer = [x for x in fields([x for x in fs if x[0] == 2][0][2]) if x[0] not in (1, 2, 3, 35)]
    trainer += [(3, 0, model_type)] + ([(35, 0, 1)] if byte_fallback else [])
    normalizer = [(1, 2, b"identity"), (3, 0, 1), (4, 0, 1), (5, 0, 1)]  # dummy prefix, extra spaces, escape
    return encode(kept + [(2, 2, encode(trainer)), (3, 2, encode(normalizer))])


tok_config = json.dumps({"pad_token": "<pad>", "model_max_length": 8}).encode()
seed("sentencepiece", "unigram", SEP.join([spm(1), tok_config, b"a red kite  over a boat"]))
seed("sentencepiece", "bpe", SEP.join([spm(2, pieces=30), b"{}", "a Ball \u00e9\u00e9 \t kites".encode()]))

# --- fairness: --fairness lines, --fairness-file, attribute file, "assignment mode" ------
colour = read("configs", "attributes", "colour.json")
seed("fairness", "flags", SEP.join([b"gender=30:70\ncolour=red:40,blue:60", b"", colour, b"quota exact"]))
fairness_file = {"attributes": [{"name": "gender", "edit_guidance_scale": 5}],
                 "joint": {"attributes": ["gender", "colour"],
                           "targets": {"female,red": 40, "female,blue": 10, "male,red": 10, "male,blue": 40}}}
seed("fairness", "joint-file", SEP.join([b"", json.dumps(fairness_file).encode(), colour, b"random fast"]))
seed("fairness", "library-attribute", SEP.join([b"fuzz=1:1:2", b"", colour, b"quota exact"]))

# --- prompts: prompts file, "N SEED SHARDS INDEX", --fairness lines ---------------------
seed("prompts", "plain", SEP.join([b"a red kite\n\n  a boat on the sea  \n", b"2 42 0 -1", b""]))
jsonl = "\n".join(json.dumps(x) for x in [
    {"prompt": "a kite", "count": 3, "seed": 7, "steps": 10, "cfg_scale": 5.5, "width": 64, "height": 64},
    {"prompt": "a house", "negative_prompt": "blurry"}, {"prompt": "a ball", "count": 1}]) + "\nplain line\n"
seed("prompts", "jsonl-sharded", SEP.join([jsonl.encode(), b"2 100 3 1", b"colour=red:50,blue:50"]))

# --- manifest: two shard manifests over a.png and b.png ----------------------------------
def record(index, file, group):
    return json.dumps({"index": index, "file": file, "prompt": "a kite", "negative_prompt": "", "seed": 42 + index,
                       "steps": 50, "guidance_scale": 7.5, "width": 8, "height": 8,
                       "fairness": {"groups": {"colour": group}, "targets": {"colour": {"red": 0.5, "blue": 0.5}},
                                    "mode": "exact"}})
seed("manifest", "two-shards", SEP.join([record(0, "a.png", "red").encode() + b"\n",
                                        record(1, "b.png", "blue").encode() + b"\n{\"index\": 1, \"fi"]))
seed("manifest", "one-shard-unguided", SEP.join([b'{"index": 0, "file": "a.png", "prompt": "p"}\n'
                                                b'{"index": 1, "file": "b.png", "prompt": "q"}\n', b""]))

# --- png: small images with text chunks ---------------------------------------------------
def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(width, height, depth, colour_type, rows, extra=b""):
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    raw = b"".join(b"\0" + r for r in rows)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


texts = chunk(b"tEXt", b"parameters\0a red kite\nSteps: 2, Seed: 1") + \
    chunk(b"iTXt", b"fairdiff\0\0\0\0\0" + '{"prompt": "caf\u00e9"}'.encode())
seed("png", "rgb-text", png(2, 2, 8, 2, [b"\xdc\0\0\0\0\xdc"] * 2, texts))
seed("png", "palette", png(3, 1, 8, 3, [b"\0\1\1"], chunk(b"PLTE", b"\xff\0\0\0\xff\0")))
seed("png", "gray16-ztxt", png(2, 1, 16, 0, [b"\x12\x34\xff\xff"], chunk(b"zTXt", b"comment\0\0" + zlib.compress(b"hello"))))

# --- infotext ---------------------------------------------------------------------------
seed("infotext", "a1111", "a photo of a doctor\nNegative prompt: blurry\nSteps: 50, Sampler: PLMS, "
     "Schedule type: Automatic, CFG scale: 7.0, Seed: 42, Size: 512x512, Model hash: 6ce0161689, Model: sd15")
seed("infotext", "quoted", 'two\nlines\nSteps: 20, Fairness: "gender=female, age=old", Prompt: "a: b", '
     'Extra: "caf\\u00e9\\n", CFG scale: 7.5\x00\x00\x00\x00\x00\x00\xf0?')
