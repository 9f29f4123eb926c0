"""A/B of the two async PostgreSQL drivers for the store, in one run on one database.

What the store does per message: a few single-row round trips (ledger lookups, inserts with
RETURNING) inside a transaction, and batched inserts. Run:
``python -m bench.pg_driver postgresql://postgres@127.0.0.1:5432/test``. Prints ratios.
"""

from __future__ import annotations

import asyncio
import sys
import time

import asyncpg
import psycopg

N = 2000
_TABLE = "CREATE TABLE IF NOT EXISTS bench_driver (id bigserial PRIMARY KEY, k text, v text)"


async def _psycopg(dsn: str) -> tuple[float, float]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(_TABLE)
        t0 = time.perf_counter()
        async with conn.transaction():
            for i in range(N):
                cur = await conn.execute(
                    "INSERT INTO bench_driver(k, v) VALUES (%s, %s) RETURNING id", (str(i), "x")
                )
                await cur.fetchone()
        t1 = time.perf_counter()
        async with conn.transaction(), conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO bench_driver(k, v) VALUES (%s, %s)", [(str(i), "y") for i in range(N)]
            )
        t2 = time.perf_counter()
        await conn.execute("DROP TABLE bench_driver")
    return t1 - t0, t2 - t1


async def _asyncpg(dsn: str) -> tuple[float, float]:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(_TABLE)
        t0 = time.perf_counter()
        async with conn.transaction():
            for i in range(N):
                await conn.fetchval(
                    "INSERT INTO bench_driver(k, v) VALUES ($1, $2) RETURNING id", str(i), "x"
                )
        t1 = time.perf_counter()
        async with conn.transaction():
            await conn.executemany(
                "INSERT INTO bench_driver(k, v) VALUES ($1, $2)", [(str(i), "y") for i in range(N)]
            )
        t2 = time.perf_counter()
        await conn.execute("DROP TABLE bench_driver")
    finally:
        await conn.close()
    return t1 - t0, t2 - t1


async def main(dsn: str) -> None:
    best: dict[str, list[float]] = {}
    for _ in range(3):
        for name, fn in (("psycopg", _psycopg), ("asyncpg", _asyncpg)):
            single, many = await fn(dsn)
            old = best.setdefault(name, [single, many])
            best[name] = [min(old[0], single), min(old[1], many)]
    p, a = best["psycopg"], best["asyncpg"]
    print(
        f"{N} single-row INSERT..RETURNING in one transaction: psycopg {p[0] * 1e3:.0f} ms, "
        f"asyncpg {a[0] * 1e3:.0f} ms, psycopg/asyncpg {p[0] / a[0]:.2f}"
    )
    print(
        f"executemany of {N} rows: psycopg {p[1] * 1e3:.0f} ms, asyncpg {a[1] * 1e3:.0f} ms, "
        f"psycopg/asyncpg {p[1] / a[1]:.2f}"
    )


if __name__ == "__main__":
    asyncio.run(
        main(sys.argv[1] if len(sys.argv) > 1 else "postgresql://postgres@127.0.0.1:5432/test")
    )
