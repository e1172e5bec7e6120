"""The Kimad controller, free of any training framework.

Bandwidth estimator, cost model, budgets, menus, allocators and plans.
"""
