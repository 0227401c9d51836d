"""Auto-paginating iterators over cursor-paginated lists (`{"data", "next_cursor"}`).

Nothing is fetched until you iterate; each page is requested when the previous one runs out.
`pages()` yields whole pages instead of items.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class SyncPager(Generic[T]):
    """`for item in pager` walks every page; `max_items` stops early."""

    def __init__(self, fetch: Callable[[str | None], Any], *, max_items: int | None = None):
        self._fetch = fetch
        self._max_items = max_items

    def pages(self) -> Iterator[Any]:
        cursor: str | None = None
        while True:
            page = self._fetch(cursor)
            yield page
            cursor = page.next_cursor
            if not cursor:
                return

    def __iter__(self) -> Iterator[T]:
        count = 0
        if self._max_items is not None and self._max_items <= 0:
            return
        for page in self.pages():
            for item in page.data:
                yield item
                count += 1
                if self._max_items is not None and count >= self._max_items:
                    return


class AsyncPager(Generic[T]):
    """`async for item in pager` walks every page; `max_items` stops early."""

    def __init__(
        self, fetch: Callable[[str | None], Awaitable[Any]], *, max_items: int | None = None
    ):
        self._fetch = fetch
        self._max_items = max_items

    async def pages(self) -> AsyncIterator[Any]:
        cursor: str | None = None
        while True:
            page = await self._fetch(cursor)
            yield page
            cursor = page.next_cursor
            if not cursor:
                return

    async def __aiter__(self) -> AsyncIterator[T]:
        count = 0
        if self._max_items is not None and self._max_items <= 0:
            return
        async for page in self.pages():
            for item in page.data:
                yield item
                count += 1
                if self._max_items is not None and count >= self._max_items:
                    return

    async def to_list(self) -> list[T]:
        """Every item, collected."""
        return [item async for item in self]
