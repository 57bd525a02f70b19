"""Wire types of the OpenAI-compatible routes (``/v1/embeddings``, ``/v1/models``), in OpenAI's
own shapes so that its clients parse them: https://platform.openai.com/docs/api-reference/embeddings
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

EncodingFormat = Literal["float", "base64"]


class TextItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(description="a caption, tokenized by the model's own tokenizer")


class ImageItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(description="http(s) URL, data: URI or base64 of the encoded image")


InputItem = str | TextItem | ImageItem
# Token arrays are in the type so that they can be refused with a message saying why (the ids
# are the client's tokenizer's, not the model's) instead of pydantic's list of union failures.
EmbeddingInput = Annotated[
    str | list[InputItem] | list[int] | list[list[int]],
    Field(
        description='A text, or a list of texts and `{"text": ...}` / `{"image": ...}` '
        "objects (images as http(s) URLs, data: URIs or base64), mixed as you like; one "
        "embedding per item, in order. Token arrays are not accepted: send the texts."
    ),
]


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(
        description="L2-normalized; with encoding_format=base64, the little-endian float32 "
        "bytes in base64"
    )


class Usage(BaseModel):
    prompt_tokens: int = Field(description="the texts' tokens as the model encodes them; images: 0")
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="when the model was saved to the model store (Unix time)")
    owned_by: str = Field(description="the open_clip pretrained tag, or the weights' source")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None = Field(description="the service's own error code")
    request_id: str | None = Field(default=None, description="quote it when reporting a failure")


class ErrorResponse(BaseModel):
    error: ErrorDetail
