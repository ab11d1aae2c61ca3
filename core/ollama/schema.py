"""The Ollama routes in the app's OpenAPI schema, under their own tag. They are served on the front door (raw ASGI,
like /v1), which FastAPI does not see, so their operations are added to the schema FastAPI builds."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

TAG = 'ollama'


class Error(BaseModel):
    error: str = Field(description='What went wrong (Ollama clients raise it as ResponseError)')


class Message(BaseModel):
    role: str
    content: str = ''
    thinking: str | None = None
    images: list[str] | None = Field(None, description='Base64 images, for a model with a vision projector')
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None


class _Generation(BaseModel):
    model: str = Field(description='Our model id or alias; `name:latest` accepted')
    stream: bool = Field(True, description='NDJSON, one object per token; false: one object')
    format: str | dict[str, Any] | None = Field(None, description='"json" or a JSON schema')
    options: dict[str, Any] | None = Field(
        None,
        description='temperature, top_p, top_k, min_p, repeat_penalty, seed, stop, num_predict, num_ctx (a '
        'cap: more than the model runs with is refused) ...; load-time options are taken from the model parameters',
    )
    think: bool | str | None = None
    keep_alive: str | float | None = Field(None, description='0: unload once answered; "5m": idle time before unload')


class ChatRequest(_Generation):
    messages: list[Message] = Field(default_factory=list, description='Empty: just load (or unload) the model')
    tools: list[dict[str, Any]] | None = None


class GenerateRequest(_Generation):
    prompt: str = Field('', description='Empty: just load (or unload) the model')
    system: str | None = None
    raw: bool = Field(False, description='The prompt as it is, without the chat template')
    images: list[str] | None = None


class Stats(BaseModel):
    model: str
    created_at: str
    done: bool
    done_reason: str | None = None
    total_duration: int | None = Field(None, description='Nanoseconds, as every duration here')
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class ChatResponse(Stats):
    message: Message


class GenerateResponse(Stats):
    response: str
    thinking: str | None = None


class EmbedRequest(BaseModel):
    model: str
    input: str | list[str]
    keep_alive: str | float | None = None


class EmbedResponse(BaseModel):
    model: str
    embeddings: list[list[float]]
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None


class EmbeddingsRequest(BaseModel):
    model: str
    prompt: str


class EmbeddingsResponse(BaseModel):
    embedding: list[float]


class Details(BaseModel):
    parent_model: str = ''
    format: str = 'gguf'
    family: str
    families: list[str] | None
    parameter_size: str
    quantization_level: str


class Listed(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str = Field(description='Of the file as found (path, size, time); not a hash of its content')
    details: Details


class Tags(BaseModel):
    models: list[Listed]


class Running(Listed):
    size_vram: int
    expires_at: str | None = Field(description='When it unloads if it stays idle; null: never')
    context_length: int | None


class Ps(BaseModel):
    models: list[Running]


class ShowRequest(BaseModel):
    model: str
    verbose: bool = False


class Shown(BaseModel):
    license: str
    modelfile: str
    parameters: str
    template: str
    details: Details
    model_info: dict[str, Any] = Field(description='The GGUF key/values (big arrays only with verbose)')
    capabilities: list[str]
    modified_at: str


class Version(BaseModel):
    version: str = Field(description='The Ollama API level these routes follow')
    llama_async_proxy: str


ERRORS = {
    '400': 'Bad body or option (e.g. num_ctx over the running context)',
    '404': 'No such model',
    '409': 'The model file cannot be loaded',
    '413': 'Body over max_body_bytes',
    '429': 'Too many requests in flight for the model',
    '502': 'llama-server failed mid-answer',
    '503': 'The model could not be started',
}
# path -> (method, summary, request model, response model, error statuses)
OPERATIONS: dict[str, tuple[str, str, type[BaseModel] | None, type[BaseModel], tuple[str, ...]]] = {
    '/api/chat': ('post', 'Chat (NDJSON stream unless stream is false)', ChatRequest, ChatResponse, tuple(ERRORS)),
    '/api/generate': ('post', 'Generate from a prompt', GenerateRequest, GenerateResponse, tuple(ERRORS)),
    '/api/embed': ('post', 'Embeddings for one or more inputs', EmbedRequest, EmbedResponse, tuple(ERRORS)),
    '/api/embeddings': ('post', 'Embedding (older form)', EmbeddingsRequest, EmbeddingsResponse, tuple(ERRORS)),
    '/api/tags': ('get', 'Every model found', None, Tags, ()),
    '/api/show': ('post', 'A model: GGUF metadata, template, capabilities', ShowRequest, Shown, ('400', '404', '409')),
    '/api/ps': ('get', 'Loaded models', None, Ps, ()),
    '/api/version': ('get', 'The Ollama API level', None, Version, ()),
}
REFUSED = ('/api/pull', '/api/push', '/api/create', '/api/copy', '/api/delete')


def add_to(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` (FastAPI's OpenAPI document) with the Ollama operations and their models added."""
    components = schema.setdefault('components', {}).setdefault('schemas', {})
    ref = '#/components/schemas/{model}'

    def model_ref(model: type[BaseModel]) -> dict[str, str]:
        js = model.model_json_schema(ref_template=ref)
        for name, sub in js.pop('$defs', {}).items():
            components.setdefault(name, sub)
        components.setdefault(model.__name__, js)
        return {'$ref': ref.format(model=model.__name__)}

    paths = schema.setdefault('paths', {})
    error = {'application/json': {'schema': model_ref(Error)}}
    for path, (method, summary, request, response, errors) in OPERATIONS.items():
        op: dict[str, Any] = {
            'tags': [TAG],
            'summary': summary,
            'operationId': f'ollama_{path.rsplit("/", 1)[-1]}',
            'responses': {
                '200': {'description': 'OK', 'content': _ok_content(path, model_ref(response))},
                **{code: {'description': ERRORS[code], 'content': error} for code in errors},
            },
        }
        if request is not None:
            op['requestBody'] = {'required': True, 'content': {'application/json': {'schema': model_ref(request)}}}
        paths.setdefault(path, {})[method] = op
    for path in REFUSED:
        paths.setdefault(path, {})['delete' if path == '/api/delete' else 'post'] = {
            'tags': [TAG],
            'summary': 'Not served here: the error says what to do instead',
            'operationId': f'ollama_{path.rsplit("/", 1)[-1]}',
            'responses': {'501': {'description': 'What this server does instead', 'content': error}},
        }
    return schema


def _ok_content(path: str, ref: dict[str, str]) -> dict[str, Any]:
    if path in ('/api/chat', '/api/generate'):  # streamed unless `stream` is false: one such object per line
        return {'application/json': {'schema': ref}, 'application/x-ndjson': {'schema': ref}}
    return {'application/json': {'schema': ref}}
