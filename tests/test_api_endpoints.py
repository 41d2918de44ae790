"""Model cards, /tokenize, /detokenize and /version through a live server."""

import importlib.metadata

import httpx
import openai
import pytest
from server_util import MODEL, RunningServer, openai_client, tiny_core_factory

MESSAGES = [{"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def srv():
    with RunningServer(tiny_core_factory(), api_key="sekrit") as server:
        yield server.wait_ready()


@pytest.fixture(scope="module")
def client(srv):
    return openai_client(srv, api_key="sekrit")


def post(srv, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{srv.url}{path}", json=body, headers={"Authorization": "Bearer sekrit"})


def test_model_card_fields_and_stable_created(client, srv) -> None:
    first = client.models.list().data[0]
    assert (first.id, first.object, first.owned_by) == (MODEL, "model", "logquant-serve")
    extra = first.model_extra
    assert extra["max_model_len"] == 512 and extra["root"] == MODEL and extra["parent"] is None
    assert client.models.list().data[0].created == first.created == srv.app.state.logquant.ctx.created


def test_retrieve_model(client) -> None:
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.model_extra["max_model_len"] == 512
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-9")
    assert err.value.status_code == 404
    assert err.value.body == {
        "message": "The model `gpt-9` does not exist.",
        "type": "not_found_error",
        "param": "model",
        "code": "model_not_found",
    }


def test_model_routes_need_the_key(srv) -> None:
    assert httpx.get(f"{srv.url}/v1/models/{MODEL}").status_code == 401
    assert httpx.post(f"{srv.url}/tokenize", json={"prompt": "a"}).status_code == 401
    assert httpx.get(f"{srv.url}/version").status_code == 200  # like /health: no key


def test_tokenize_prompt(srv) -> None:
    tokenizer = srv.core.tokenizer
    r = post(srv, "/tokenize", {"model": MODEL, "prompt": "Hello!", "return_token_strs": True})
    assert r.status_code == 200
    ids = tokenizer.encode("Hello!")
    assert r.json() == {"count": 6, "max_model_len": 512, "tokens": ids, "token_strs": ["H", "e", "l", "l", "o", "!"]}
    assert "token_strs" not in post(srv, "/tokenize", {"prompt": "Hello!"}).json()


def test_tokenize_messages_matches_the_chat_prompt(srv) -> None:
    tokenizer = srv.core.tokenizer
    expected = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    r = post(srv, "/tokenize", {"messages": MESSAGES})
    assert r.json()["tokens"] == expected and r.json()["count"] == len(expected)
    bare = post(srv, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False}).json()["tokens"]
    assert bare == tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=False, return_dict=False)
    assistant = [*MESSAGES, {"role": "assistant", "content": "Hel"}]
    cont = post(
        srv, "/tokenize", {"messages": assistant, "add_generation_prompt": False, "continue_final_message": True}
    ).json()["tokens"]
    assert tokenizer.decode(cont).endswith("<|im_start|>assistant\nHel")
    # add_special_tokens with messages: the rendered text encoded with the tokenizer's specials
    special = post(srv, "/tokenize", {"messages": MESSAGES, "add_special_tokens": True})
    assert special.status_code == 200
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert special.json()["tokens"] == tokenizer.encode(text, add_special_tokens=True)


def test_detokenize_round_trip(srv) -> None:
    ids = post(srv, "/tokenize", {"prompt": "Grüße, fox"}).json()["tokens"]
    assert post(srv, "/detokenize", {"model": MODEL, "tokens": ids}).json() == {"prompt": "Grüße, fox"}


@pytest.mark.parametrize(
    "path,body,status,param",
    [
        ("/detokenize", {"tokens": [5, 259]}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens.0"),
        ("/detokenize", {"tokens": ["5"]}, 400, "tokens.0"),
        ("/detokenize", {"tokens": [5], "model": "gpt-9"}, 404, "model"),
        ("/tokenize", {"prompt": "a", "messages": MESSAGES}, 400, "prompt"),
        ("/tokenize", {}, 400, "prompt"),
        ("/tokenize", {"prompt": "a", "add_generation_prompt": True}, 400, "add_generation_prompt"),
        ("/tokenize", {"messages": MESSAGES, "continue_final_message": True}, 400, "continue_final_message"),
        ("/tokenize", {"prompt": "a", "chat_template": "x"}, 400, "chat_template"),
        ("/tokenize", {"prompt": "a", "add_special_tokens": 1}, 400, "add_special_tokens"),
    ],
)
def test_tokenizer_endpoints_reject_bad_input(srv, path: str, body: dict, status: int, param: str) -> None:
    r = post(srv, path, body)
    assert r.status_code == status
    assert r.json()["error"]["param"] == param


def test_version(srv) -> None:
    r = httpx.get(f"{srv.url}/version")
    assert r.json() == {"version": importlib.metadata.version("logquant-serve")}
