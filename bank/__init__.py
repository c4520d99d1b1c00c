"""The clustering service: a feature/label memory bank sharded over Ray actors, with online
mini-batch k-means (InterCLR, 003_*.txt Sect. 4) and negative sampling near the data."""
from bank.shard import STRATEGIES, BankShard, BankStateError
from bank.spec import BankSpec

__all__ = ["MemoryBank", "BankShard", "BankSpec", "BankStateError", "STRATEGIES"]


def __getattr__(name):
    # The client needs Ray; the shard alone (e.g. timed on a GPU machine without Ray) does not.
    if name == "MemoryBank":
        from bank.client import MemoryBank
        return MemoryBank
    raise AttributeError(name)
