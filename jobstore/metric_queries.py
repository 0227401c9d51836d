"""The SQL behind ``Store.query_metrics`` and ``Store.metric_names``: one job's metrics, read or
downsampled, shaped for the primary key ``(job_id, name, step)``.

* names: a "skip scan" (recursive CTE, one index probe per distinct name) instead of a DISTINCT
  over every row;
* first and last step of each name in the requested range: two index probes per name;
* downsampling (``max_points``): per name that needs it, one grouped index range scan of its
  interior steps, all in one statement with the first and last points.

Downsampling, per name: when the name's points in the range fit in ``max_points`` they are
returned as they are. Otherwise the first and the last point are returned as they are, and the
points strictly between are grouped into ``max_points - 2`` equal step ranges (integer division
of ``step - first - 1`` by the interior span), each non-empty range returned as one point
``(its last step, the mean of its values)``. So at most ``max_points`` points, ascending steps,
first and last kept. A name whose step span fits in ``max_points`` is read as is without
counting; a wider one is grouped, and if its groups show it had no more than ``max_points``
points after all (a sparse series), it is read as is instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa

from jobstore.tables import metrics

Points = list[tuple[int, float]]
_NAMES_PER_QUERY = 200  # SQLite allows at most 500 terms in a compound SELECT (1 + 1 per name)


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _step_range(
    column: sa.ColumnElement[int], step_min: int | None, step_max: int | None
) -> list[sa.ColumnElement[bool]]:
    where: list[sa.ColumnElement[bool]] = []
    if step_min is not None:
        where.append(column >= step_min)
    if step_max is not None:
        where.append(column <= step_max)
    return where


def metric_names(session: sa.Connection, job_id: str) -> list[str]:
    """The job's distinct metric names, sorted (one index probe per name)."""
    m = metrics
    following = metrics.alias("following")
    names = (
        sa.select(sa.func.min(m.c.name).label("name"))
        .where(m.c.job_id == job_id)
        .cte("names", recursive=True)
    )
    next_name = (
        sa.select(sa.func.min(following.c.name))
        .where(following.c.job_id == job_id, following.c.name > names.c.name)
        .scalar_subquery()
    )
    names = names.union_all(sa.select(next_name).where(names.c.name.is_not(None)))
    query = sa.select(names.c.name).where(names.c.name.is_not(None)).order_by(names.c.name)
    return list(session.execute(query).scalars())


def _literal_rows(
    rows: Sequence[tuple[Any, ...]],
    columns: Sequence[tuple[str, sa.types.TypeEngine[Any]]],
    name: str,
) -> sa.CTE:
    """A CTE of literal rows (``SELECT … UNION ALL SELECT …``: portable, unlike VALUES lists)."""
    selects = [
        sa.select(
            *(
                sa.literal(value, type_).label(column)
                for value, (column, type_) in zip(row, columns, strict=True)
            )
        )
        for row in rows
    ]
    body = selects[0] if len(selects) == 1 else sa.union_all(*selects)
    return body.cte(name)


def step_bounds(
    session: sa.Connection,
    job_id: str,
    names: Sequence[str],
    step_min: int | None,
    step_max: int | None,
) -> dict[str, tuple[int, int]]:
    """``{name: (first step, last step)}`` in the range, for the names that have points there."""
    m = metrics
    bounds: dict[str, tuple[int, int]] = {}
    for chunk in _chunks(list(dict.fromkeys(names)), _NAMES_PER_QUERY):
        wanted = _literal_rows([(n,) for n in chunk], [("name", sa.String())], "wanted")
        probe = [
            m.c.job_id == job_id,
            m.c.name == wanted.c.name,
            *_step_range(m.c.step, step_min, step_max),
        ]
        first = sa.select(sa.func.min(m.c.step)).where(*probe).scalar_subquery()
        last = sa.select(sa.func.max(m.c.step)).where(*probe).scalar_subquery()
        for name, lo, hi in session.execute(sa.select(wanted.c.name, first, last)):
            if lo is not None:
                bounds[name] = (int(lo), int(hi))
    return bounds


def read_points(
    session: sa.Connection,
    job_id: str,
    names: Sequence[str] | None,
    step_min: int | None,
    step_max: int | None,
) -> dict[str, Points]:
    """Every point of the names (all names if ``None``) in the range, ascending by step."""
    m = metrics
    where = [m.c.job_id == job_id, *_step_range(m.c.step, step_min, step_max)]
    result: dict[str, Points] = {}
    batches: list[Sequence[str] | None] = (
        [None] if names is None else list(_chunks(list(names), _NAMES_PER_QUERY))
    )
    for batch in batches:
        query = sa.select(m.c.name, m.c.step, m.c.value).where(*where)
        if batch is not None:
            query = query.where(m.c.name.in_(list(batch)))
        for name, step, value in session.execute(query.order_by(m.c.name, m.c.step)):
            result.setdefault(name, []).append((int(step), float(value)))
    return result


def _grouped(
    session: sa.Connection, job_id: str, bounds: dict[str, tuple[int, int]], max_points: int
) -> dict[str, list[tuple[int, int, float]]]:
    """``{name: [(count, last step, mean), …]}``: the groups of each (wide) name, its first
    and last point being groups of one.

    One statement per chunk of names: a ``UNION ALL`` of one branch reading every name's first
    and last point, and per name one ``SELECT count, max(step), sum(value) … GROUP BY bucket``
    over its interior steps: an index range scan with the name's bounds as constants. (Measured
    on PostgreSQL: faster than joining a bounds table, and than one CASE-bucketed pass with
    ``avg``.) The constants are integers the database returned, inlined rather than bound: a
    bound parameter in a GROUP BY expression does not match the same expression in the SELECT
    list on PostgreSQL.
    """
    m = metrics
    interior = int(max_points) - 2
    groups: dict[str, list[tuple[int, int, float]]] = {}
    for chunk in _chunks(sorted(bounds), _NAMES_PER_QUERY):
        ends = sa.tuple_(m.c.name, m.c.step).in_(
            [(name, step) for name in chunk for step in bounds[name]]
        )
        branches: list[sa.Select[Any]] = [
            sa.select(
                m.c.name.label("name"),
                sa.literal_column("1", sa.Integer()).label("n"),
                m.c.step.label("step"),
                m.c.value.label("total"),
            ).where(m.c.job_id == job_id, ends)
        ]
        for name in chunk if interior > 0 else ():
            first, last = (int(x) for x in bounds[name])
            offset = sa.cast(m.c.step, sa.BigInteger()) - sa.literal_column(str(first + 1))
            bucket = (
                offset
                * sa.literal_column(str(interior))
                // sa.literal_column(str(last - first - 1), sa.BigInteger())
            )
            branches.append(
                sa.select(
                    sa.literal(name, sa.String()).label("name"),
                    sa.func.count().label("n"),
                    sa.func.max(m.c.step).label("step"),
                    sa.func.sum(m.c.value).label("total"),
                )
                .where(
                    m.c.job_id == job_id,
                    m.c.name == name,
                    m.c.step > first,
                    m.c.step < last,
                )
                .group_by(bucket)
            )
        query = branches[0] if len(branches) == 1 else sa.union_all(*branches)
        for name, count, last_step, total in session.execute(query):
            groups.setdefault(name, []).append((int(count), int(last_step), total / count))
    return groups


def downsample(
    session: sa.Connection,
    job_id: str,
    names: Sequence[str] | None,
    step_min: int | None,
    step_max: int | None,
    max_points: int,
) -> dict[str, Points]:
    """At most ``max_points`` points per name, as described in the module doc."""
    if names is None:
        names = metric_names(session, job_id)
    bounds = step_bounds(session, job_id, names, step_min, step_max)
    as_is = [n for n, (lo, hi) in bounds.items() if hi - lo + 1 <= max_points]
    wide = {n: (lo, hi) for n, (lo, hi) in bounds.items() if hi - lo + 1 > max_points}
    result: dict[str, Points] = {}
    for name, groups in _grouped(session, job_id, wide, max_points).items():
        if sum(count for count, _, _ in groups) <= max_points and any(c > 1 for c, _, _ in groups):
            as_is.append(name)  # sparse: it fits after all
        else:
            result[name] = sorted((step, mean) for _, step, mean in groups)
    if as_is:
        result.update(read_points(session, job_id, as_is, step_min, step_max))
    return {name: result[name] for name in sorted(result)}
