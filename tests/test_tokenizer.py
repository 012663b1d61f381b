"""The tokenizer: round trips, special tokens, chat template, saving for and loading from transformers."""

import json

import pytest

from qwen3.data.sources import kjv_books
from qwen3.data.tokenizer import SPECIAL_TOKENS, Tokenizer, load_tokenizer, train_tokenizer
from qwen3.errors import UserError

# The chat template published with Qwen/Qwen3-4B-Base (tokenizer_config.json), to check that a
# real Qwen3 folder's template renders with our jinja environment.
QWEN3_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who begat Isaac?"},
                {"role": "assistant", "content": "Abraham."}, {"role": "user", "content": "And Jacob?"}]
EXPECTED_CHAT = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWho begat Isaac?<|im_end|>\n"
                 "<|im_start|>assistant\nAbraham.<|im_end|>\n<|im_start|>user\nAnd Jacob?<|im_end|>\n"
                 "<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def books() -> list[str]:
    return kjv_books()


@pytest.fixture(scope="module")
def tokenizer(books: list[str]) -> Tokenizer:
    return train_tokenizer(books, vocab_size=512)


def test_round_trip_on_the_default_corpus(tokenizer: Tokenizer, books: list[str]) -> None:
    encoded = tokenizer.encode_batch(books)
    assert [tokenizer.decode(ids) for ids in encoded] == books
    assert encoded[0] == tokenizer.encode(books[0])
    # A trained BPE compresses: well over one byte per token even at this small vocabulary.
    assert sum(map(len, books)) / sum(map(len, encoded)) > 2


def test_round_trip_outside_the_training_alphabet(tokenizer: Tokenizer) -> None:
    text = "Ünïcödé naïve café — 日本語 😀\ttabs\r\n  spaces  \n\n1234567 x=y+1; 'quoted' it's"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_nfc_normalization(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode("cafe\u0301") == tokenizer.encode("caf\u00e9")


def test_special_tokens_are_single_ids(tokenizer: Tokenizer) -> None:
    ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
    assert ids == [0, 1, 2]
    for token, token_id in zip(SPECIAL_TOKENS, ids):
        assert tokenizer.encode(token) == [token_id]
    text = "In the beginning<|im_end|>\n<|endoftext|>God"
    encoded = tokenizer.encode(text)
    assert encoded.count(ids[2]) == 1 and encoded.count(ids[0]) == 1
    assert tokenizer.decode(encoded) == text
    assert tokenizer.decode(encoded, skip_special_tokens=True) == "In the beginning\nGod"


def test_roles_and_stop_tokens(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == 512
    assert tokenizer.eos_token_id == tokenizer.token_to_id("<|endoftext|>")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.bos_token_id is None
    assert tokenizer.stop_token_ids == [tokenizer.eos_token_id, tokenizer.token_to_id("<|im_end|>")]
    assert tokenizer.token_to_id("<|no such token|>") is None
    assert tokenizer.encode("") == [] and tokenizer.decode([]) == ""


def test_chat_template(tokenizer: Tokenizer) -> None:
    assert tokenizer.apply_chat_template(CONVERSATION) == EXPECTED_CHAT
    without_prompt = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=False)
    assert without_prompt == EXPECTED_CHAT.removesuffix("<|im_start|>assistant\n")
    assert tokenizer.encode(EXPECTED_CHAT).count(tokenizer.token_to_id("<|im_start|>")) == 5


def test_too_small_vocab_is_a_user_error() -> None:
    with pytest.raises(UserError, match="at least 259"):
        train_tokenizer(["abc"], vocab_size=100)


def test_no_chat_template_is_a_user_error(tokenizer: Tokenizer) -> None:
    bare = Tokenizer(tokenizer.backend, eos_token="<|endoftext|>")
    with pytest.raises(UserError, match="no chat template"):
        bare.apply_chat_template(CONVERSATION)


def test_save_and_load(tokenizer: Tokenizer, tmp_path) -> None:
    tokenizer.save_pretrained(tmp_path)
    assert {path.name for path in tmp_path.iterdir()} == {
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["eos_token"] == "<|endoftext|>" and config["chat_template"]
    text = "And God said, Let there be light<|im_end|>"
    for path in (tmp_path, tmp_path / "tokenizer.json"):
        loaded = load_tokenizer(path)
        assert loaded.encode(text) == tokenizer.encode(text)
        assert loaded.eos_token_id == tokenizer.eos_token_id
        assert loaded.apply_chat_template(CONVERSATION) == EXPECTED_CHAT


def test_transformers_loads_the_saved_tokenizer(tokenizer: Tokenizer, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    tokenizer.save_pretrained(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "In the beginning God created the heaven and the earth.<|endoftext|>"
    assert theirs.encode(text, add_special_tokens=False) == tokenizer.encode(text)
    assert theirs.decode(tokenizer.encode(text)) == text
    assert theirs.eos_token_id == tokenizer.eos_token_id
    assert theirs.pad_token_id == tokenizer.pad_token_id
    assert len(theirs) == tokenizer.vocab_size
    rendered = theirs.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert rendered == EXPECTED_CHAT


def test_loads_a_qwen3_style_folder(tokenizer: Tokenizer, tmp_path) -> None:
    """A real Qwen3 folder: eos is <|im_end|> (as an AddedToken dict here), no bos, its own template."""
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(eos_token={"__type": "AddedToken", "content": "<|im_end|>", "special": True},
                  bos_token=None, pad_token="<|endoftext|>", chat_template=QWEN3_CHAT_TEMPLATE,
                  model_max_length=131072)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    qwen = load_tokenizer(tmp_path)
    assert qwen.eos_token_id == tokenizer.token_to_id("<|im_end|>")
    assert qwen.stop_token_ids == [qwen.eos_token_id, tokenizer.token_to_id("<|endoftext|>")]
    assert qwen.model_max_length == 131072
    assert qwen.apply_chat_template(CONVERSATION) == EXPECTED_CHAT
    assert qwen.apply_chat_template(CONVERSATION, enable_thinking=False) == \
        EXPECTED_CHAT + "<think>\n\n</think>\n\n"


def test_chat_template_in_its_own_file(tokenizer: Tokenizer, tmp_path) -> None:
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    template = config.pop("chat_template")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text(template)
    assert load_tokenizer(tmp_path).apply_chat_template(CONVERSATION) == EXPECTED_CHAT


def test_load_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="tokenizer not found: .*missing"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(UserError, match="no tokenizer.json in"):
        load_tokenizer(tmp_path)
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{not json")
    with pytest.raises(UserError, match="is not a valid tokenizer.json"):
        load_tokenizer(broken)
