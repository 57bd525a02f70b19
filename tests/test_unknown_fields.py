"""Unknown fields are refused by name, but only the first few are named: a body of many unknown
keys gets a small answer, and the per-key errors are never built."""

from __future__ import annotations

import json

import bentoml
import pytest
from pydantic import ValidationError

from clip_service.bentoml_adapter import forbid_unknown_fields
from clip_service.middleware.error_envelope import MAX_LISTED_PROBLEMS, rewrite_error
from clip_service.schemas import MAX_NAMED_UNKNOWN_FIELDS, BatchItem


@bentoml.service
class _Api:
    @bentoml.api(route="/score")
    def score(self, image: str, text: str, items: list[BatchItem] | None = None) -> str:
        return text  # pragma: no cover - only its input model is used


forbid_unknown_fields(_Api.apis.values())
SPEC = _Api.apis["score"].input_spec
KEYS = 20_000


def refused(body: dict[str, object]) -> list[dict[str, object]]:
    with pytest.raises(ValidationError) as error:
        SPEC.model_validate_json(json.dumps(body))
    return error.value.errors(include_context=False, include_input=False)


def test_many_unknown_fields_give_a_few_errors_and_a_count() -> None:
    detail = refused({"image": "a", "text": "b", **{f"k{i}": 1 for i in range(KEYS)}})
    assert len(detail) == MAX_NAMED_UNKNOWN_FIELDS + 1
    assert [d["loc"] for d in detail[:2]] == [("k0",), ("k1",)]
    assert detail[-1]["msg"] == f"{KEYS - MAX_NAMED_UNKNOWN_FIELDS} more unknown fields"
    body = json.dumps({"detail": detail}, default=list).encode()
    answer = rewrite_error(400, body, "r1", tuple(SPEC.model_fields))
    message = json.loads(answer)["error"]["message"]
    assert message.startswith("unknown field 'k0' (fields: ")
    assert message.endswith(f"{KEYS - MAX_NAMED_UNKNOWN_FIELDS} more unknown fields")
    assert len(answer) < 5_000


def test_one_unknown_field_is_named_as_before_and_known_ones_pass() -> None:
    assert [d["loc"] for d in refused({"image": "a", "text": "b", "caption": "c"})] == [
        ("caption",)
    ]
    assert SPEC.model_validate_json(json.dumps({"image": "a", "text": "b"})).text == "b"


def test_a_long_unknown_name_is_echoed_cut_short() -> None:
    for unknown in ({"x" * 100_000: 1}, {f"{i}" + "x" * 100_000: 1 for i in range(20)}):
        detail = refused({"image": "a", "text": "b", **unknown})
        body = json.dumps({"detail": detail}, default=list).encode()
        assert len(rewrite_error(400, body, "r1", tuple(SPEC.model_fields))) < 5_000


def test_unknown_fields_of_batch_items_are_bounded_too() -> None:
    item = {"image": "a", **{f"k{i}": 1 for i in range(KEYS)}}
    detail = refused({"image": "a", "text": "b", "items": [item]})
    assert len(detail) == MAX_NAMED_UNKNOWN_FIELDS + 1
    assert detail[0]["loc"] == ("items", 0, "k0")


def test_an_error_answer_lists_a_bounded_number_of_problems() -> None:
    detail = [{"type": "missing", "loc": ["items", i, "text"], "msg": "x"} for i in range(10_000)]
    answer = json.loads(rewrite_error(400, json.dumps({"detail": detail}).encode(), "r1"))
    assert len(answer["error"]["detail"]) == MAX_LISTED_PROBLEMS
    assert answer["error"]["message"].endswith(f"and {10_000 - MAX_LISTED_PROBLEMS} more problems")
