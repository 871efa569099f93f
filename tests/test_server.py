"""The real server on a real port, driven by the official openai client and by httpx."""

import asyncio
import json
import re
import shutil
import signal
import ssl
import subprocess
import time

import httpx
import jsonschema
import openai
import pytest
import torch

from gptstack.checkpoint import load_model
from gptstack.heads import mean_pooled_embeddings
from gptstack.inference.sampling import SamplingParams
from gptstack.serve.app import ServeConfig, create_app
from gptstack.serve.schemas import ChatCompletionRequest, CompletionRequest
from gptstack.serve.security import KeyStore

from conftest import Server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0)


def test_models_and_completions(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    out = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=12, seed=1, temperature=0.7)
    assert out.object == "text_completion" and out.choices[0].finish_reason in ("length", "stop")
    assert out.usage.prompt_tokens == 3 and 0 < out.usage.completion_tokens <= 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    again = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=12, seed=1, temperature=0.7)
    assert again.choices[0].text == out.choices[0].text


def test_completion_options(client):
    out = client.completions.create(model="tiny", prompt=["ROMEO:", "KING:"], max_tokens=5, n=2, echo=True,
                                    logprobs=2, temperature=0, extra_body={"ignore_eos": True})
    assert len(out.choices) == 4
    assert out.choices[0].text.startswith("ROMEO:") and out.choices[2].text.startswith("KING:")
    lp = out.choices[0].logprobs
    # echo scores the prompt too, as OpenAI does: its first token has no logprob.
    assert len(lp.tokens) == 3 + 5 and lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    assert all(len(t) == 2 for t in lp.top_logprobs[1:])
    assert out.usage.completion_tokens == 20


def test_streaming_completion(client):
    chunks = list(client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=10, stream=True, seed=3,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices
    quiet = list(client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=10, stream=True, seed=3,
                                           extra_body={"ignore_eos": True}))
    assert all(c.usage is None for c in quiet) and "".join(c.choices[0].text for c in quiet) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    whole = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=10, seed=3, extra_body={"ignore_eos": True})
    assert text == whole.choices[0].text


def test_chat_completion_and_stream(client):
    messages = [{"role": "system", "content": "You are a poet."}, {"role": "user", "content": "Speak of love"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, seed=2, logprobs=True,
                                         top_logprobs=2)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens >= 1
    assert all(len(t.top_logprobs) == 2 for t in out.choices[0].logprobs.content)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, seed=2, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == out.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_sse_ends_with_done(server):
    with httpx.stream("POST", server.url + "/v1/completions", headers=server.headers, timeout=30,
                      json={"model": "tiny", "prompt": "a", "max_tokens": 3, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_tokenize_detokenize_health_ready(server):
    r = httpx.post(server.url + "/tokenize", headers=server.headers, json={"prompt": "Hello world"})
    assert r.json()["tokens"] == [15496, 995] and r.json()["max_model_len"] == 256
    r = httpx.post(server.url + "/detokenize", headers=server.headers, json={"tokens": [15496, 995]})
    assert r.json() == {"prompt": "Hello world"}
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").json()["status"] == "ready"


def test_every_route_needs_a_key_except_the_allow_list(server, tiny_checkpoint):
    """Walk the app's whole route table: nothing outside the allow-list answers without a key."""
    from gptstack.inference.engine import Engine
    from gptstack.checkpoint import load_model
    model, tok, _ = load_model(tiny_checkpoint)
    config = ServeConfig(keys=KeyStore(["k"]))
    app = create_app(Engine(model, tok), config)
    checked = 0
    for route in app.routes:
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            if method == "HEAD":
                continue
            path = re.sub(r"\{[^}]+\}", "x", route.path)
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dGVzdC1rZXk="}):
                r = httpx.request(method, server.url + path, headers=headers, json={})
                if route.path in config.public_paths:
                    assert r.status_code in (200, 503), route.path
                else:
                    assert r.status_code == 401, (method, route.path, r.status_code)
                    assert r.json()["error"]["code"] == "invalid_api_key"
            checked += 1
    assert checked >= 10
    assert httpx.get(server.url + "/openapi.json").status_code == 401
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/metrics", headers={"X-API-Key": server.key}).status_code == 200


@pytest.mark.parametrize("body, status, fragment", [
    ({"model": "gpt-4", "prompt": "x"}, 404, "does not exist"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 300}, 400, "more than the context"),
    ({"model": "tiny", "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"model": "tiny", "prompt": "x", "n": 50}, 400, "n must be at most"),
    ({"model": "tiny", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": 42}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"model": "tiny", "prompt": "x", "temprature": 1}, 400, "unknown parameter"),
    ({"model": "tiny", "prompt": [10**7]}, 400, "outside the vocabulary"),
    ({"model": "tiny", "prompt": ""}, 400, "at least 1 character"),
    ({"prompt": "x"}, 400, "model"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"99999999": 5}}, 400, "outside the vocabulary"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"a": 5}}, 400, "logit_bias"),
    ({"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": "tiny", "prompt": "x", "n": 2, "best_of": 1}, 400, "best_of"),
    ({"model": "tiny", "prompt": "x", "best_of": 3, "stream": True}, 400, "best_of"),
    ({"model": "tiny", "prompt": "x", "best_of": 50}, 400, "best_of"),
    ({"model": "tiny", "prompt": "x", "suffix": "y"}, 400, "suffix"),
])
def test_bad_parameters_get_openai_errors(server, body, status, fragment):
    r = httpx.post(server.url + "/v1/completions", headers=server.headers, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment in error["message"] and error["type"]


def test_malformed_oversized_and_non_utf8_bodies(server):
    url, headers = server.url + "/v1/completions", {**server.headers, "Content-Type": "application/json"}
    r = httpx.post(url, headers=headers, content=b'{"model": "tiny", "prompt": ')
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(url, headers=headers, content=b'{"model": "tiny", "prompt": "\xff\xfe"}')
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url, headers=headers, content=b'{"model": "tiny", "prompt": "' + b"a" * (2 << 20) + b'"}')
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = httpx.post(server.url + "/v1/chat/completions", headers=server.headers, json={"model": "tiny", "messages": []})
    assert r.status_code == 400


def test_concurrent_requests_are_batched(server):
    """8 concurrent requests share decode steps: the engine's own counters show several rows per
    forward pass (1.0 would mean one request at a time), with no clock involved."""
    body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 48, "ignore_eos": True, "temperature": 0}

    def counters() -> dict[str, float]:
        text = httpx.get(server.url + "/metrics", headers=server.headers).text
        return {name: float(line.split()[-1]) for line in text.splitlines()
                for name in ("gptstack_engine_generated_tokens_total", "gptstack_engine_decode_steps_total")
                if line.startswith(name + " ")}

    async def run(n):
        async with httpx.AsyncClient(headers=server.headers, timeout=120) as c:
            results = await asyncio.gather(*[c.post(server.url + "/v1/completions", json=body) for _ in range(n)])
            assert all(r.status_code == 200 for r in results)

    before = counters()
    asyncio.run(run(8))
    after = counters()
    tokens, steps = (after[k] - before[k] for k in ("gptstack_engine_generated_tokens_total",
                                                      "gptstack_engine_decode_steps_total"))
    assert tokens >= 8 * 47 and tokens / steps > 3, (tokens, steps)
    metrics = httpx.get(server.url + "/metrics", headers=server.headers).text
    assert "gptstack_time_to_first_token_seconds_count" in metrics and "gptstack_batch_size" in metrics


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", headers=server.headers).text
    match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_a_repeated_prompt_prefix_comes_from_the_prefix_cache(server):
    """Two requests sharing a long prompt over HTTP: the second finds the first's full KV blocks
    cached (the counter grows by at least all but the last block), and answers the same text."""
    prompt = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 3
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0}
    first = httpx.post(server.url + "/v1/completions", json=body, headers=server.headers, timeout=60).json()
    before = metric(server, "gptstack_engine_prefix_cache_hit_tokens_total")
    second = httpx.post(server.url + "/v1/completions", json=body, headers=server.headers, timeout=60).json()
    hits = metric(server, "gptstack_engine_prefix_cache_hit_tokens_total") - before
    assert hits >= first["usage"]["prompt_tokens"] - 2 * 16 and hits % 16 == 0
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    assert metric(server, "gptstack_kv_cache_blocks_free") <= metric(server, "gptstack_kv_cache_blocks")


def wait_for(predicate, seconds=20.0):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_client_disconnect_cancels_streaming_and_plain_requests(server):
    before = metric(server, "gptstack_requests_cancelled_total")
    body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 250, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", headers=server.headers, timeout=30,
                      json={**body, "stream": True}) as r:
        next(r.iter_lines())
    assert wait_for(lambda: metric(server, "gptstack_requests_cancelled_total") >= before + 1)
    with pytest.raises(httpx.TimeoutException):   # 8 samples: work the server cannot finish before it notices
        httpx.post(server.url + "/v1/completions", headers=server.headers, json={**body, "n": 8}, timeout=0.05)
    assert wait_for(lambda: metric(server, "gptstack_requests_cancelled_total") >= before + 2)
    assert wait_for(lambda: metric(server, "gptstack_batch_size") == 0)


def test_rate_limits_and_bounded_queue(tiny_checkpoint):
    limited = Server(tiny_checkpoint, "--requests-per-minute", "2", "--max-batch-size", "1", "--max-queue", "1")
    try:
        body = {"model": "tiny", "prompt": "a", "max_tokens": 2}
        codes = [httpx.post(limited.url + "/v1/completions", headers=limited.headers, json=body).status_code
                 for _ in range(3)]
        assert codes == [200, 200, 429]
        r = httpx.post(limited.url + "/v1/completions", headers=limited.headers, json=body)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        limited.stop()

    busy = Server(tiny_checkpoint, "--max-batch-size", "1", "--max-queue", "1")
    try:
        body = {"model": "tiny", "prompt": "a", "max_tokens": 60, "ignore_eos": True}

        async def burst():
            async with httpx.AsyncClient(headers=busy.headers, timeout=120) as c:
                return await asyncio.gather(*[c.post(busy.url + "/v1/completions", json=body) for _ in range(6)])

        codes = sorted(r.status_code for r in asyncio.run(burst()))
        assert 200 in codes and 503 in codes and set(codes) <= {200, 503}
    finally:
        busy.stop()


def test_logs_leave_prompts_out_unless_asked(server, tiny_checkpoint):
    httpx.post(server.url + "/v1/completions", headers=server.headers,
               json={"model": "tiny", "prompt": "SECRET-PROMPT-TEXT", "max_tokens": 1})
    assert "POST /v1/completions -> 200" in server.output()
    assert "SECRET-PROMPT-TEXT" not in server.output()


def test_sigterm_finishes_in_flight_requests_then_exits_zero(tiny_checkpoint):
    s = Server(tiny_checkpoint)
    chunks = []
    with httpx.stream("POST", s.url + "/v1/completions", headers=s.headers, timeout=60,
                      json={"model": "tiny", "prompt": "a", "max_tokens": 60, "ignore_eos": True, "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
        lines = r.iter_lines()
        chunks.append(next(lines))
        s.proc.send_signal(signal.SIGTERM)
        chunks.extend(line for line in lines if line)
    assert s.proc.wait(timeout=60) == 0
    assert chunks[-1] == "data: [DONE]"
    usage = [json.loads(c[6:]) for c in chunks if c.startswith("data: {")][-1]["usage"]
    assert usage["completion_tokens"] == 60
    with pytest.raises(httpx.ConnectError):
        httpx.get(s.url + "/health")
    s.log.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls(tiny_checkpoint, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    s = Server(tiny_checkpoint, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), scheme="https")
    try:
        with httpx.Client(verify=ssl.create_default_context(cafile=str(cert))) as http:
            client = openai.OpenAI(base_url=s.url + "/v1", api_key=s.key, http_client=http)
            assert client.completions.create(model="tiny", prompt="a", max_tokens=2).usage.completion_tokens >= 1
        with pytest.raises((httpx.RemoteProtocolError, httpx.ConnectError)):
            httpx.get(s.url.replace("https", "http") + "/health")   # no plain HTTP on the TLS port
    finally:
        s.stop()


def test_default_chat_template_renders_roles(server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = httpx.post(server.url + "/tokenize", headers=server.headers, json={"messages": messages})
    tokens = r.json()["tokens"]
    r = httpx.post(server.url + "/detokenize", headers=server.headers, json={"tokens": tokens})
    assert r.json()["prompt"] == "Be brief.\n\nUser: Hi\nAssistant:"


def test_port_in_use_is_a_clear_error(server, tiny_checkpoint):
    from conftest import run_cli
    proc = run_cli("serve", "--checkpoint", str(tiny_checkpoint), "--port", str(server.port), "--api-key", "k")
    assert proc.returncode == 2 and "could not start" in proc.stderr and "Traceback" not in proc.stderr


def test_classify_route(tiny_classifier, server):
    from gptstack.checkpoint import load_classifier
    from gptstack.heads import classification_ids
    texts = ["this movie was wonderful , the plot too", "the acting was dreadful , every scene too"]
    s = Server(tiny_classifier, "--max-batch-size", "4", "--tokens-per-minute", "40")
    try:
        url = s.url + "/v1/classify"
        assert httpx.post(url, json={"input": texts[0]}).status_code == 401
        r = httpx.post(url, json={"model": "tiny", "input": texts}, headers=s.headers)
        assert r.status_code == 200, r.text
        body = r.json()
        assert [d["label"] for d in body["data"]] == ["1", "0"]
        classifier, tok, _ = load_classifier(tiny_classifier)
        ids = [classification_ids(tok, t, 256) for t in texts]
        expected = classifier.predict(ids)
        for row, probs in zip(body["data"], expected.tolist()):
            assert row["scores"]["0"] + row["scores"]["1"] == pytest.approx(1.0)
            assert [row["scores"]["0"], row["scores"]["1"]] == pytest.approx(probs, abs=1e-5)
        assert body["usage"]["prompt_tokens"] == sum(len(i) for i in ids)
        bad = httpx.post(url, json={"input": []}, headers=s.headers)
        assert bad.status_code == 400 and bad.json()["error"]["message"].startswith("input: List should have at least 1 item")
        wrong = httpx.post(url, json={"model": "other", "input": "x"}, headers=s.headers)
        assert wrong.status_code == 404
        # the same server still completes text with the fine-tuned backbone
        assert httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 3},
                          headers=s.headers).status_code == 200
        # the same per-key token budget as the completion routes: about 24 of 40 tokens spent, so 3 more
        # texts (~29 tokens) must wait, and 6 can never fit
        big = httpx.post(url, json={"input": texts * 3}, headers=s.headers)
        assert big.status_code == 400 and "per-minute limit of 40" in big.json()["error"]["message"]
        assert httpx.post(url, json={"input": texts + texts[:1]}, headers=s.headers).status_code == 429
    finally:
        s.stop()
    # a language model without a head answers 404 with a hint
    r = httpx.post(server.url + "/v1/classify", json={"input": "hello"}, headers=server.headers)
    assert r.status_code == 404 and "no classification head" in r.json()["error"]["message"]


def test_requests_convert_themselves_to_sampling_params():
    """Every sampling field reaches the engine, and each of the n samples gets its own seed."""
    body = CompletionRequest(model="tiny", prompt="x", max_tokens=9, temperature=0.5, top_p=0.9, top_k=3, min_p=0.1,
                             presence_penalty=0.2, frequency_penalty=-0.3, repetition_penalty=1.2, seed=5, stop="END",
                             stop_token_ids=[7], ignore_eos=True, logprobs=1, logit_bias={"7": 250, "9": -3.5})
    assert body.sampling_params(2) == SamplingParams(
        max_new_tokens=9, temperature=0.5, top_p=0.9, top_k=3, min_p=0.1, presence_penalty=0.2, frequency_penalty=-0.3,
        repetition_penalty=1.2, seed=7, stop=["END"], stop_token_ids=[7], ignore_eos=True, logprobs=1,
        logit_bias={7: 100.0, 9: -3.5})          # clamped to [-100, 100] as OpenAI does
    assert CompletionRequest(model="tiny", prompt="x", max_tokens=None).sampling_params(0).max_new_tokens == 16

    messages = [{"role": "user", "content": "hi"}]
    chat = ChatCompletionRequest(model="tiny", messages=messages, stop="x", logprobs=True)
    params = chat.sampling_params(0, context_left=100, chat_stops=["\nUser:"])
    assert (params.max_new_tokens, params.stop, params.logprobs, params.seed) == (100, ["x", "\nUser:"], 0, None)
    chat = ChatCompletionRequest(model="tiny", messages=messages, max_tokens=8, max_completion_tokens=4, logprobs=True,
                                 top_logprobs=3)
    assert (chat.sampling_params(1, 100, []).max_new_tokens, chat.sampling_params(1, 100, []).logprobs) == (4, 3)
    assert ChatCompletionRequest(model="tiny", messages=messages).sampling_params(0, 100, []).logprobs is None


def test_streamed_choices_match_whole_ones_with_echo_and_n(client):
    """The echo leads each streamed choice once, and the n choices of each prompt stay apart."""
    kwargs = dict(model="tiny", prompt=["ROMEO:", "KING:"], max_tokens=4, n=2, echo=True, temperature=0,
                  extra_body={"ignore_eos": True})
    chunks = [c for c in client.completions.create(stream=True, **kwargs) if c.choices]
    streamed = ["".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in range(4)]
    assert streamed == [c.text for c in client.completions.create(**kwargs).choices]


def test_errors_are_counted_by_status(server):
    def errors(code):
        return metric(server, re.escape(f'gptstack_errors_total{{code="{code}"}}'))

    before = {code: errors(code) for code in (400, 401, 404)}
    httpx.post(server.url + "/v1/completions", headers=server.headers, json={"model": "tiny", "prompt": 42})
    httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
    httpx.post(server.url + "/v1/completions", headers=server.headers, json={"model": "gpt-4", "prompt": "x"})
    assert {code: errors(code) - before[code] for code in before} == {400: 1, 401: 1, 404: 1}


def test_logit_bias_forces_and_bans_tokens(client, server):
    greedy = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=4, temperature=0, logprobs=0,
                                       extra_body={"ignore_eos": True})
    first = httpx.post(server.url + "/tokenize", headers=server.headers,
                       json={"prompt": greedy.choices[0].logprobs.tokens[0]}).json()["tokens"][0]
    banned = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=4, temperature=0, logprobs=0,
                                       logit_bias={str(first): -100}, extra_body={"ignore_eos": True})
    assert banned.choices[0].logprobs.tokens[0] != greedy.choices[0].logprobs.tokens[0]
    forced = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=4, temperature=0.9, seed=1,
                                       logit_bias={"11": 100}, extra_body={"ignore_eos": True})   # 11 is ","
    assert forced.choices[0].text == ",,,,"


def test_best_of_returns_the_candidates_of_highest_logprob_per_token(client):
    kwargs = dict(model="tiny", prompt="ROMEO:", max_tokens=6, temperature=1.0, seed=11, extra_body={"ignore_eos": True})
    candidates = client.completions.create(n=4, logprobs=0, **kwargs).choices   # sample i has seed 11 + i, as best_of's
    ranked = sorted(candidates, key=lambda c: sum(c.logprobs.token_logprobs) / 6, reverse=True)
    best = client.completions.create(n=2, best_of=4, **kwargs)
    assert [c.text for c in best.choices] == [c.text for c in ranked[:2]]
    assert [c.index for c in best.choices] == [0, 1] and best.choices[0].logprobs is None
    assert best.usage.completion_tokens == 24                        # every candidate was generated


def test_embeddings_through_the_openai_client(client, server, tiny_checkpoint):
    texts = ["To be, or not to be", "To be, or not to be", "Now is the winter of our discontent"]
    out = client.embeddings.create(model="tiny", input=texts)      # the client asks for base64 and decodes it
    vectors = torch.tensor([d.embedding for d in out.data])
    model, tokenizer, _ = load_model(tiny_checkpoint)
    ids = [tokenizer.encode(t) for t in texts]
    assert vectors.shape == (3, model.config.n_embd) and [d.index for d in out.data] == [0, 1, 2]
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(3))
    assert torch.equal(vectors[0], vectors[1]) and (vectors[0] - vectors[2]).abs().max() > 1e-3
    torch.testing.assert_close(vectors, mean_pooled_embeddings(model, ids), atol=1e-4, rtol=1e-4)
    assert out.usage.prompt_tokens == out.usage.total_tokens == sum(map(len, ids))
    plain = httpx.post(server.url + "/v1/embeddings", headers=server.headers,
                       json={"model": "tiny", "input": ids[2], "encoding_format": "float"}).json()
    torch.testing.assert_close(torch.tensor(plain["data"][0]["embedding"]), vectors[2])
    for body, fragment in [({"input": []}, "at least 1 item"), ({"input": "x", "dimensions": 3}, "dimensions"),
                           ({"input": [[1] * 5000]}, "more than the context"), ({"input": [[10 ** 7]]}, "vocabulary"),
                           ({"input": "x", "encoding_format": "int8"}, "encoding_format")]:
        r = httpx.post(server.url + "/v1/embeddings", headers=server.headers, json={"model": "tiny", **body})
        assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text


def test_response_format_json_schema_through_the_openai_client(client, server):
    schema = {"type": "object", "required": ["name", "age"],
              "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0,
                                                                                  "maximum": 99}}}
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    messages = [{"role": "user", "content": "Who are you?"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=80, seed=3, n=2,
                                         response_format=response_format)
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), {**schema, "additionalProperties": False})
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=80, seed=3, stream=True,
                                            response_format=response_format)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == out.choices[0].message.content
    for bad, fragment in [({"type": "yaml"}, "response_format"), ({"type": "json_schema"}, "json_schema"),
                          ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}, "strin")]:
        r = httpx.post(server.url + "/v1/chat/completions", headers=server.headers,
                       json={"model": "tiny", "messages": messages, "response_format": bad})
        assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text


def test_echo_with_logprobs_scores_the_prompt(client, tiny_checkpoint):
    """Echo with logprobs reports the prompt's tokens with the model's own logprobs (the first has
    none), then the generated ones; max_tokens 0 scores only, as evaluation harnesses ask."""
    model, tokenizer, _ = load_model(tiny_checkpoint)
    prompt = "ROMEO: speak again, bright angel"
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids]))[0][0].float(), dim=-1)
    expected = [None] + [expected[p, ids[p + 1]].item() for p in range(len(ids) - 1)]

    scored = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    choice = scored.choices[0]
    assert choice.text == prompt and scored.usage.completion_tokens == 0 and scored.usage.prompt_tokens == len(ids)
    assert choice.logprobs.tokens == [tokenizer.decode([t]) for t in ids]
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected[1:], abs=1e-3)
    assert all(len(top) == 2 and max(top.values()) >= lp - 1e-4
               for top, lp in zip(choice.logprobs.top_logprobs[1:], choice.logprobs.token_logprobs[1:]))

    generated = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, echo=True, logprobs=0,
                                          temperature=0, extra_body={"ignore_eos": True}).choices[0]
    assert generated.logprobs.tokens[:len(ids)] == choice.logprobs.tokens
    assert generated.logprobs.token_logprobs[1:len(ids)] == pytest.approx(expected[1:], abs=1e-3)
    assert len(generated.logprobs.tokens) == len(ids) + 3
    assert generated.logprobs.text_offset == [len("".join(generated.logprobs.tokens[:i])) for i in range(len(ids) + 3)]
    assert generated.text == "".join(generated.logprobs.tokens)

    with pytest.raises(openai.BadRequestError, match="only allowed with echo"):
        client.completions.create(model="tiny", prompt=prompt, max_tokens=0)
