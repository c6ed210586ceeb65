"""Scaling laws from runs: ladders of sizes x budgets (`ladder`, `sweep`), points from run
directories or tables (`points`), three fitting approaches (`parametric`, `frontier`), the
compute-optimal allocation (`allocation`) and the report (`analysis`, `report`, `plots`).
`docs/scaling.md` walks from a ladder to a compute-optimal plan."""
