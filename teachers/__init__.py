"""Rankers that teach the pre-rankers.

``TEACHERS``: neural teachers trained through ``cascade.tasks`` like the pre-rankers;
``BOOSTED``: teachers with their own training function (LightGBM).
"""

from teachers.din import DIN
from teachers.gbdt import train_gbdt

TEACHERS = {"din": DIN}
BOOSTED = {"gbdt": train_gbdt}
