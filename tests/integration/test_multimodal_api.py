"""Images through the OpenAI API: the official `openai` client against `xllm serve --model <tiny Qwen2.5-VL>`.

Images arrive as data: URLs and as http URLs served by a local aiohttp server on 127.0.0.1; the
greedy reply equals transformers' `generate` on the same weights, prompt and pixels (token for
token, read back from the logprobs' exact bytes). Every kind of bad image gets a 400 that says
what was wrong, and the next good request is served as before. A text-only model (the default
SmolLM2) refuses image parts.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from collections.abc import Iterator

import openai
import pytest
import torch
from aiohttp import web
from PIL import Image

from common.bus import free_tcp_port
from tests.unit._vl_model import sample_image

pytestmark = pytest.mark.timeout(900)

MAX_TOKENS = 8
MAX_IMAGE_BYTES = 300_000  # --image-max-bytes of the VL server
MAX_IMAGE_PIXELS = 4_000_000  # --image-max-pixels
MAX_IMAGES = 4  # --max-images-per-request
FETCH_TIMEOUT_S = 2  # --image-fetch-timeout


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts: dict | str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]}


# ---------------------------------------------------------------------------- the image host

IMAGES = {"cat": sample_image(56, 56, seed=0), "dog": sample_image(84, 56, seed=1), "bird": sample_image(112, 84, 2)}
NOISE = Image.frombytes("RGB", (400, 400), torch.randint(0, 256, (400 * 400 * 3,), dtype=torch.uint8,
                                                         generator=torch.Generator().manual_seed(5)).numpy().tobytes())


class ImageHost:
    """An aiohttp server on 127.0.0.1 (its own thread and loop) that the gateway fetches images from."""

    def __init__(self) -> None:
        self.port = free_tcp_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _app(self) -> web.Application:
        async def image(request: web.Request) -> web.Response:
            name = request.match_info["name"]
            if name not in IMAGES:
                raise web.HTTPNotFound()
            return web.Response(body=png(IMAGES[name]), content_type="image/png")

        async def jpeg(request: web.Request) -> web.Response:
            out = io.BytesIO()
            IMAGES["cat"].save(out, format="JPEG")
            return web.Response(body=out.getvalue(), content_type="image/jpeg")

        async def html(request: web.Request) -> web.Response:
            return web.Response(text="<html>no image here</html>", content_type="text/html")

        async def fake_png(request: web.Request) -> web.Response:
            return web.Response(body=b"this is text, whatever the header says", content_type="image/png")

        async def big(request: web.Request) -> web.Response:
            return web.Response(body=png(NOISE), content_type="image/png")

        async def slow(request: web.Request) -> web.Response:
            await asyncio.sleep(FETCH_TIMEOUT_S + 3)
            return web.Response(body=png(IMAGES["cat"]), content_type="image/png")

        app = web.Application()
        app.router.add_get("/img/{name}.png", image)
        app.router.add_get("/cat.jpg", jpeg)
        app.router.add_get("/page.html", html)
        app.router.add_get("/fake.png", fake_png)
        app.router.add_get("/big.png", big)
        app.router.add_get("/slow.png", slow)
        return app

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        runner = web.AppRunner(self._app())
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self.runner = runner
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())

    def __enter__(self) -> ImageHost:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def host() -> Iterator[ImageHost]:
    with ImageHost() as running:
        yield running


# ---------------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def vl_server(xllm_server_factory, tiny_vl_model_dir):  # noqa: ANN001, ANN201
    return xllm_server_factory(workers=1, extra_args=(
        "--model", tiny_vl_model_dir, "--image-max-bytes", str(MAX_IMAGE_BYTES),
        "--image-max-pixels", str(MAX_IMAGE_PIXELS), "--max-images-per-request", str(MAX_IMAGES),
        "--image-fetch-timeout", str(FETCH_TIMEOUT_S)))


@pytest.fixture(scope="module")
def vl(vl_server) -> openai.OpenAI:  # noqa: ANN001
    return openai.OpenAI(base_url=f"{vl_server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def vl_model(vl_server) -> str:  # noqa: ANN001
    return vl_server.model_id()


# ------------------------------------------------------------------------ the transformers side


class Reference:
    """transformers' greedy `generate` on the tiny model, its tokenizer and its image processor."""

    def __init__(self, model_dir: str) -> None:
        import transformers

        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        self.processor = transformers.AutoImageProcessor.from_pretrained(model_dir)
        self.model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
            model_dir, dtype=torch.float32).eval()
        self.pad = "<|image_pad|>"
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.byte_token = bytes_to_unicode()  # byte -> its byte-level token (GPT-2's table)

    def prompt(self, messages: list[dict], images: list[Image.Image]) -> tuple[list[int], dict]:
        """The prompt ids and vision inputs as Qwen2.5-VL's processor builds them: the template
        writes one pad per image, and each pad becomes t*h*w / merge^2 pads."""
        plain = [{**m, "content": [{"type": "image"} if p.get("type") == "image_url" else p for p in m["content"]]}
                 if isinstance(m["content"], list) else m for m in messages]
        text = self.tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
        vision = self.processor(images=images, return_tensors="pt")
        merge = self.processor.merge_size ** 2
        pieces = text.split(self.pad)
        assert len(pieces) == len(images) + 1
        expanded = pieces[0]
        for grid, piece in zip(vision["image_grid_thw"].tolist(), pieces[1:]):
            expanded += self.pad * (grid[0] * grid[1] * grid[2] // merge) + piece
        return self.tokenizer(expanded, add_special_tokens=False)["input_ids"], dict(vision)

    @torch.no_grad()
    def greedy(self, messages: list[dict], images: list[Image.Image]) -> tuple[list[int], list[int]]:
        ids, vision = self.prompt(messages, images)
        input_ids = torch.tensor([ids])
        # transformers builds M-RoPE positions only when told which tokens are image tokens (its full
        # processor returns this; the image processor alone does not): without it, 1-D positions.
        mm_types = (input_ids == self.model.config.image_token_id).int()
        out = self.model.generate(input_ids, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  mm_token_type_ids=mm_types, **vision, max_new_tokens=MAX_TOKENS, do_sample=False)
        return ids, out[0, len(ids):].tolist()

    def ids_of(self, logprobs: list) -> list[int]:
        """The token ids of a reply, read back from its logprob entries' exact bytes (this tokenizer
        is bytes plus special tokens, so one entry is one byte or one special token)."""
        ids = []
        for entry in logprobs:
            if len(entry.bytes) == 1:
                ids.append(self.tokenizer.convert_tokens_to_ids(self.byte_token[entry.bytes[0]]))
            else:
                ids.append(self.tokenizer.convert_tokens_to_ids(bytes(entry.bytes).decode()))
        return ids


@pytest.fixture(scope="module")
def reference(tiny_vl_model_dir) -> Reference:  # noqa: ANN001
    return Reference(tiny_vl_model_dir)


def ask(client: openai.OpenAI, model: str, messages: list[dict], **extra: object):  # noqa: ANN201
    return client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                          logprobs=True, **extra)


def assert_matches(response, reference: Reference, messages: list[dict], images: list[Image.Image]) -> None:  # noqa: ANN001
    prompt_ids, want = reference.greedy(messages, images)
    (choice,) = response.choices
    assert reference.ids_of(choice.logprobs.content) == want
    assert response.usage.prompt_tokens == len(prompt_ids)  # image placeholders count as prompt tokens
    assert response.usage.completion_tokens == len(want)


# ------------------------------------------------------------------------------------ tests


def test_data_url_image_equals_transformers(vl, vl_model, reference) -> None:
    messages = [user("What is in this picture?", image_part(data_url(png(IMAGES["cat"]))))]
    assert_matches(ask(vl, vl_model, messages), reference, messages, [IMAGES["cat"]])


def test_http_url_image_equals_transformers_and_the_data_url(vl, vl_model, reference, host) -> None:
    by_http = [user(image_part(f"{host.url}/img/dog.png"), "Describe it.")]
    response = ask(vl, vl_model, by_http)
    assert_matches(response, reference, by_http, [IMAGES["dog"]])
    by_data = [user(image_part(data_url(png(IMAGES["dog"]))), "Describe it.")]
    assert ask(vl, vl_model, by_data).choices[0].message.content == response.choices[0].message.content


def test_two_images_in_one_message(vl, vl_model, reference, host) -> None:
    messages = [user("Compare", image_part(f"{host.url}/img/cat.png"), "with",
                     image_part(data_url(png(IMAGES["bird"]))))]
    assert_matches(ask(vl, vl_model, messages), reference, messages, [IMAGES["cat"], IMAGES["bird"]])


def test_images_across_turns(vl, vl_model, reference, host) -> None:
    messages = [
        user("Look at this.", image_part(f"{host.url}/img/bird.png")),
        {"role": "assistant", "content": "A bird."},
        user("And this one?", image_part(data_url(png(IMAGES["dog"])))),
    ]
    assert_matches(ask(vl, vl_model, messages), reference, messages, [IMAGES["bird"], IMAGES["dog"]])


def test_api_equals_the_offline_engine(vl, vl_model, reference, tiny_vl_model_dir, host) -> None:
    from common.engine.llm import LLM
    from common.engine.sampling_params import SamplingParams

    messages = [
        user("First:", image_part(f"{host.url}/img/cat.png"), "then", image_part(data_url(png(IMAGES["bird"])))),
        {"role": "assistant", "content": "Two pictures."},
        user(image_part(f"{host.url}/cat.jpg"), "and a JPEG."),
    ]
    jpeg = io.BytesIO()
    IMAGES["cat"].save(jpeg, format="JPEG")
    pil = [IMAGES["cat"], IMAGES["bird"], Image.open(io.BytesIO(jpeg.getvalue())).convert("RGB")]
    offline_conv, k = [], 0
    for message in messages:
        if isinstance(message["content"], list):
            parts = []
            for part in message["content"]:
                if part["type"] == "image_url":
                    part, k = {"type": "image", "image": pil[k]}, k + 1
                parts.append(part)
            message = {**message, "content": parts}
        offline_conv.append(message)
    llm = LLM(tiny_vl_model_dir, dtype="float32")
    (offline,) = llm.chat(offline_conv, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    response = ask(vl, vl_model, messages)
    assert reference.ids_of(response.choices[0].logprobs.content) == offline.outputs[0].token_ids
    assert response.usage.prompt_tokens == len(offline.prompt_token_ids)
    assert response.choices[0].message.content == offline.outputs[0].text


def test_streaming_gives_the_same_reply(vl, vl_model, host) -> None:
    messages = [user(image_part(f"{host.url}/img/cat.png"), "Stream it.")]
    whole = ask(vl, vl_model, messages).choices[0].message.content
    stream = vl.chat.completions.create(model=vl_model, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                        stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == whole


def test_a_repeated_image_request_reuses_the_cached_prefix(vl, vl_model) -> None:
    # Text no other test sends, and a fresh image: nothing of the first request can be cached yet.
    text = "Prefix cache check:"
    messages = [user(text, image_part(data_url(png(sample_image(56, 84, seed=11)))), "what is it?")]
    # <|im_start|>, "user\n", the text (one byte token per character), <|vision_start|>
    first_image_token = 1 + len("user\n") + len(text) + 1
    first = ask(vl, vl_model, messages)
    second = ask(vl, vl_model, messages)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # The pages holding image tokens are reused too, not only the text before the image.
    assert second.usage.prompt_tokens_details.cached_tokens > first_image_token
    assert second.choices[0].message.content == first.choices[0].message.content
    # Same text, other pixels: nothing from the first image token on may be reused.
    other = [user(text, image_part(data_url(png(sample_image(56, 84, seed=12)))), "what is it?")]
    third = ask(vl, vl_model, other)
    assert third.usage.prompt_tokens_details.cached_tokens <= first_image_token


def _huge_canvas() -> bytes:
    return png(Image.new("RGB", (2500, 2000), (9, 9, 9)))  # 5 Mpx in a few KiB


BAD_IMAGES = [
    # (name, url (a callable of the host), words the 400 message must hold)
    ("corrupt", lambda h: data_url(png(IMAGES["cat"])[:300]), "corrupt"),
    ("not an image", lambda h: data_url(b"just some text, no pixels at all"), "not an image"),
    ("too many bytes", lambda h: data_url(png(NOISE)), f"{MAX_IMAGE_BYTES}"),
    ("too many pixels", lambda h: data_url(_huge_canvas()), f"at most {MAX_IMAGE_PIXELS}"),
    ("data URL of text", lambda h: data_url(png(IMAGES["cat"]), "text/plain"), "image/* media type"),
    ("bad base64", lambda h: "data:image/png;base64,@@@not-base64@@@", "base64"),
    ("unsupported scheme", lambda h: "file:///etc/passwd", "data:, http: or https:"),
    ("unreachable URL", lambda h: f"http://127.0.0.1:{free_tcp_port()}/nothing.png", "could not be fetched"),
    ("HTTP 404", lambda h: f"{h.url}/img/none.png", "HTTP 404"),
    ("non-image content type", lambda h: f"{h.url}/page.html", "text/html"),
    ("image content type, text body", lambda h: f"{h.url}/fake.png", "not an image"),
    ("fetched too large", lambda h: f"{h.url}/big.png", f"{MAX_IMAGE_BYTES}"),
    ("fetch timeout", lambda h: f"{h.url}/slow.png", f"longer than {FETCH_TIMEOUT_S} s"),
]


@pytest.mark.parametrize("name, url, words", BAD_IMAGES, ids=[case[0] for case in BAD_IMAGES])
def test_a_bad_image_is_a_400_and_the_next_request_is_served(vl, vl_model, host, name, url, words) -> None:
    good = [user("Fine:", image_part(data_url(png(IMAGES["cat"]))))]
    before = ask(vl, vl_model, good).choices[0].message.content
    bad = [user("Look:", image_part(data_url(png(IMAGES["dog"]))), image_part(url(host)))]
    with pytest.raises(openai.BadRequestError) as caught:
        ask(vl, vl_model, bad)
    error = caught.value.body
    assert words in error["message"], error
    assert error["param"] == "messages[0].content[2]", error
    assert ask(vl, vl_model, good).choices[0].message.content == before


def test_too_many_images_is_a_400(vl, vl_model) -> None:
    url = data_url(png(IMAGES["cat"]))
    with pytest.raises(openai.BadRequestError, match=f"at most {MAX_IMAGES}"):
        ask(vl, vl_model, [user(*[image_part(url)] * (MAX_IMAGES + 1))])
    assert ask(vl, vl_model, [user(*[image_part(url)] * MAX_IMAGES)]).usage.completion_tokens > 0


def test_a_malformed_image_part_is_a_400(vl, vl_model) -> None:
    for part in ({"type": "image_url", "image_url": "http://x/y.png"}, {"type": "image_url", "image_url": {}},
                 {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}):
        with pytest.raises(openai.BadRequestError):
            ask(vl, vl_model, [user("hi", part)])


def test_a_text_only_model_refuses_image_parts(xllm_server_factory) -> None:
    text_server = xllm_server_factory(workers=1)  # the default SmolLM2
    client = openai.OpenAI(base_url=f"{text_server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    model = text_server.model_id()
    with pytest.raises(openai.BadRequestError, match="takes text only") as caught:
        ask(client, model, [user("What is this?", image_part(data_url(png(IMAGES["cat"]))))])
    assert caught.value.body["param"] == "messages[0].content"
    reply = ask(client, model, [user("Say hello.")])
    assert reply.usage.completion_tokens > 0


def test_a_pd_layout_serves_image_requests(xllm_server_factory, tiny_vl_model_dir, vl, vl_model, host) -> None:
    """Prefill + decode workers: an image request is served whole by the worker that prefills it (the
    decode side would lack its images' M-RoPE positions), with the mixed layout's reply."""
    pd = xllm_server_factory(extra_args=("--model", tiny_vl_model_dir, "--prefill-workers", "1",
                                         "--decode-workers", "1"))
    client = openai.OpenAI(base_url=f"{pd.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [user("P/D:", image_part(f"{host.url}/img/dog.png"), image_part(data_url(png(IMAGES["cat"]))))]
    want = ask(vl, vl_model, messages).choices[0].message.content
    assert ask(client, pd.model_id(), messages).choices[0].message.content == want
    text_only = [{"role": "user", "content": "no image here"}]
    assert ask(client, pd.model_id(), text_only).choices[0].message.content == \
        ask(vl, vl_model, text_only).choices[0].message.content
