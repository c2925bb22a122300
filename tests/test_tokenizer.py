"""Tokenizer tests: official Qwen3.5 encodings, chat templates against transformers, streaming."""
import json

import pytest

from pyflashmoe.errors import ArgumentError, FormatError
from pyflashmoe.tokenizer import StreamDecoder, Tokenizer


@pytest.fixture(scope="module")
def qwen35(test_data):
    tpl = test_data.qwen35_chat_template.read_text(encoding="utf-8")
    cfg = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    return Tokenizer(test_data.qwen35_tokenizer / "tokenizer.json", cfg, tpl)


@pytest.fixture(scope="module")
def qwen3(test_data):
    return Tokenizer.from_dir(test_data.qwen3_tokenizer)


@pytest.fixture(scope="module")
def hf_qwen3(test_data):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(test_data.qwen3_tokenizer))


def _corpus(test_data):
    p = test_data.qwen35_parity_corpus
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_qwen35_official_encodings(qwen35, test_data):
    cases = [c for c in _corpus(test_data) if c["kind"] == "encode"]
    assert len(cases) == 13
    for c in cases:
        assert qwen35.encode(c["text"]) == c["tokens"], c["name"]
        assert qwen35.decode(c["tokens"]) == c["text"] or c["name"].endswith("_official"), c["name"]


def test_qwen35_chat_case(qwen35, test_data):
    cases = [c for c in _corpus(test_data) if c["kind"] == "chat"]
    assert cases
    for c in cases:
        rendered = qwen35.apply_chat_template(c["messages"], add_generation_prompt=True)
        # The reference (llama.cpp /apply-template) trims the template's trailing "\n" after
        # "<think>"; the template text itself emits "<think>\n".
        assert rendered in (c["rendered"], c["rendered"] + "\n"), c["name"]
        assert qwen35.encode(c["rendered"]) == c["tokens"]
        ids = qwen35.apply_chat_template(c["messages"], tokenize=True)
        assert ids[:len(c["tokens"])] == c["tokens"]


_TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather for a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name, e.g. 東京"},
            "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]},
    },
}]

_CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "你好 🚀"},
     {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Again"}],
    [{"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": "", "tool_calls": [
         {"type": "function", "function": {"name": "get_weather",
                                           "arguments": {"city": "Paris", "unit": "c"}}}]},
     {"role": "tool", "content": "{\"temp\": 21}"},
     {"role": "tool", "content": "{\"humidity\": 40}"},
     {"role": "assistant", "content": "It is 21 °C."},
     {"role": "user", "content": "Thanks"}],
    [{"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4", "reasoning_content": "Simple arithmetic."},
     {"role": "user", "content": "3+3?"}],
]


@pytest.mark.parametrize("idx", range(len(_CHATS)))
@pytest.mark.parametrize("with_tools", [False, True])
@pytest.mark.parametrize("thinking", [None, False])
def test_qwen3_chat_matches_transformers(qwen3, hf_qwen3, idx, with_tools, thinking):
    msgs = _CHATS[idx]
    tools = _TOOLS if with_tools else None
    kw = {} if thinking is None else {"enable_thinking": thinking}
    ref = hf_qwen3.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=True, **kw)
    got = qwen3.apply_chat_template(msgs, tools=tools, add_generation_prompt=True, enable_thinking=thinking)
    assert got == ref
    ref_ids = hf_qwen3(ref, add_special_tokens=False)["input_ids"]
    assert qwen3.apply_chat_template(msgs, tools=tools, enable_thinking=thinking, tokenize=True) == ref_ids


def test_qwen35_template_matches_transformers_renderer(qwen35, hf_qwen3):
    """The Qwen3.5 template (XML tool calls, mapping arguments) rendered by transformers' own
    renderer vs ours; string arguments (OpenAI wire format) are parsed to the same mapping."""
    tpl = qwen35.chat_template
    msgs = _CHATS[2]
    ref = hf_qwen3.apply_chat_template(msgs, tools=_TOOLS, chat_template=tpl, tokenize=False,
                                       add_generation_prompt=True)
    assert qwen35.apply_chat_template(msgs, tools=_TOOLS) == ref
    wire = json.loads(json.dumps(msgs))
    wire[1]["tool_calls"][0]["function"]["arguments"] = json.dumps({"city": "Paris", "unit": "c"})
    assert qwen35.apply_chat_template(wire, tools=_TOOLS) == ref
    ref_nt = hf_qwen3.apply_chat_template(_CHATS[1], chat_template=tpl, tokenize=False,
                                          add_generation_prompt=True, enable_thinking=False)
    assert qwen35.apply_chat_template(_CHATS[1], enable_thinking=False) == ref_nt


def test_template_errors(qwen35, qwen3):
    with pytest.raises(ArgumentError, match="Unexpected message role"):
        qwen35.apply_chat_template([{"role": "user", "content": "x"}, {"role": "alien", "content": "x"}])
    with pytest.raises(ArgumentError):
        qwen35.apply_chat_template([])
    t = Tokenizer(qwen3.path, {}, None)
    with pytest.raises(FormatError, match="chat template"):
        t.apply_chat_template([{"role": "user", "content": "x"}])


def test_qwen3_encode_matches_transformers(qwen3, hf_qwen3, test_data):
    text = test_data.text("taylorswift_20k.txt")
    text += " 東京 👩‍💻🙂 <|im_start|>x<|im_end|> naïve café ١٢٣"
    ref = hf_qwen3(text, add_special_tokens=False)["input_ids"]
    assert qwen3.encode(text) == ref
    assert qwen3.decode(ref) == hf_qwen3.decode(ref)
    assert qwen3.eos_token == hf_qwen3.eos_token
    assert qwen3.eos_token_id == hf_qwen3.eos_token_id


_STREAM_TEXT = ("Emoji 👩‍💻🙂🚀🇯🇵 and CJK 你好，世界！東京タワー 한국어; combining é ñ, "
                "math ∑∫√ and more 🤖🧠 — done. \ufffd literal")


@pytest.mark.parametrize("which", ["qwen35", "qwen3"])
@pytest.mark.parametrize("bytes_mode", [True, False])
def test_stream_decoder(request, which, bytes_mode):
    tok = request.getfixturevalue(which)
    ids = tok.encode(_STREAM_TEXT)
    # the test must exercise tokens that split a character
    partial = [i for i in ids if "\ufffd" in tok.decode([i])]
    assert partial, "no byte-split tokens in the sample"
    s = StreamDecoder(tok)
    s._bytes_mode = bytes_mode
    pieces = [s.add(i) for i in ids] + [s.flush()]
    # only the literal U+FFFD of the text may appear, once, and never in a piece by itself split
    assert sum(p.count("\ufffd") for p in pieces) == 1
    assert "".join(pieces) == tok.decode(ids) == _STREAM_TEXT
    assert s.text == _STREAM_TEXT


def test_stream_decoder_invalid_bytes(qwen35):
    # a lone lead byte followed by ASCII: decode() shows U+FFFD; streaming must not hang on it
    lead = next(i for i in range(0, 5000)
                if (b := qwen35.token_bytes(i)) and len(b) == 1 and b[0] >= 0xE0)
    ids = [lead] + qwen35.encode("abc")
    s = qwen35.stream_decoder()
    pieces = [s.add(i) for i in ids] + [s.flush()]
    assert "".join(pieces) == qwen35.decode(ids)
    assert pieces[0] == ""


def test_from_dir_template_precedence(test_data, tmp_path, hf_qwen3):
    import shutil
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(test_data.qwen3_tokenizer / f, tmp_path / f)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["eos_token"] = {"content": "<|im_end|>", "lstrip": False, "rstrip": False,
                        "normalized": False, "single_word": False, "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = Tokenizer.from_dir(tmp_path)
    assert t.eos_token == "<|im_end|>" and t.eos_token_id == hf_qwen3.eos_token_id
    msgs = [{"role": "user", "content": "Hi"}]
    assert t.apply_chat_template(msgs) == hf_qwen3.apply_chat_template(msgs, tokenize=False,
                                                                       add_generation_prompt=True)
    tpl = "{% for m in messages %}[{{ m.role }}|{{ m.content | tojson(indent=2) }}]{% endfor %}{{ eos_token }}"
    (tmp_path / "chat_template.jinja").write_text(tpl)
    t2 = Tokenizer.from_dir(tmp_path)
    assert t2.apply_chat_template(msgs) == hf_qwen3.apply_chat_template(
        msgs, chat_template=tpl, tokenize=False, add_generation_prompt=True)
    assert t2.apply_chat_template([{"role": "user", "content": "東京"}]) == '[user|"東京"]<|im_end|>'
    with pytest.raises(FormatError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "nope")
