"""Progress bars (rank 0, with MB/s and docs/s) and the summary table printed at the end of a build."""

from __future__ import annotations

import sys

from data_pipeline.base import StepStats


class Progress:
    """A tqdm bar over bytes (MB/s) with documents per second in its postfix; silent when not shown."""

    def __init__(self, show: bool, desc: str, total: int | None) -> None:
        self.docs = 0
        self._bar = None
        if show:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                desc=desc,
                unit="B",
                unit_scale=True,
                unit_divisor=1000,
                file=sys.stderr,
                mininterval=1.0,
                dynamic_ncols=True,
            )

    def update(self, nbytes: int, ndocs: int) -> None:
        self.docs += ndocs
        if self._bar is not None:
            self._bar.update(nbytes)
            elapsed = self._bar.format_dict.get("elapsed") or 0.0
            if elapsed > 0:
                self._bar.set_postfix_str(f"{self.docs / elapsed:,.0f} docs/s", refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def summary_table(stats: dict[str, StepStats], input_bytes: int, seconds: float) -> str:
    """One row per step. `seconds` are summed over the processes that ran the step, so MB/s is per process."""
    head = f"{'step':<34} {'docs in':>10} {'docs out':>10} {'removed':>9} {'MB in':>9} {'seconds':>9} {'MB/s':>9}"
    rows = [head, "-" * len(head)]
    for name, st in stats.items():
        rate = st.bytes_in / 1e6 / st.seconds if st.seconds > 0 else float("inf")
        rows.append(
            f"{name:<34} {st.docs_in:>10,} {st.docs_out:>10,} {st.docs_in - st.docs_out:>9,} "
            f"{st.bytes_in / 1e6:>9.1f} {st.seconds:>9.2f} {rate:>9.1f}"
        )
        for reason, count in sorted(st.removed.items(), key=lambda kv: -kv[1]):
            rows.append(f"  {reason:<48} {count:>13,}")
    rows.append("-" * len(head))
    rows.append(
        f"{'end to end (wall clock)':<34} {'':>10} {'':>10} {'':>9} {input_bytes / 1e6:>9.1f} "
        f"{seconds:>9.2f} {input_bytes / 1e6 / max(seconds, 1e-9):>9.1f}"
    )
    return "\n".join(rows)
