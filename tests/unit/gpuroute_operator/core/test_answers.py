"""Whether an answer is right and what it means (core/answers.py): here, a batch item's retry rule."""

from __future__ import annotations

from gpuroute.protocol import ErrorCode, ItemAnswer, OutputInfo
from gpuroute_operator.core.answers import ItemVerdict, judge_item


def test_the_item_retry_rule() -> None:
    ok = ItemAnswer(OutputInfo(7, 2, 2, "cd" * 32, "png"))

    def failed(code: ErrorCode) -> ItemAnswer:
        return ItemAnswer(code=code, message=code.value)

    assert judge_item(ok, 1, 3) is ItemVerdict.DONE
    assert judge_item(None, 3, 3) is ItemVerdict.DONE  # the group failed as a whole: its reason stands
    assert judge_item(failed(ErrorCode.INVALID_INPUT), 1, 3) is ItemVerdict.DONE  # never retried
    for code in (ErrorCode.OOM, ErrorCode.TIMEOUT, ErrorCode.UNAVAILABLE, ErrorCode.EXPIRED):
        assert judge_item(failed(code), 1, 3) is ItemVerdict.AGAIN
        assert judge_item(failed(code), 2, 3) is ItemVerdict.AGAIN
        assert judge_item(failed(code), 3, 3) is ItemVerdict.EXHAUSTED
    assert judge_item(failed(ErrorCode.CANCELLED), 1, 3) is ItemVerdict.NOT_DONE
