"""The clustering service: a feature/label memory bank sharded over Ray actors, with online
mini-batch k-means (InterCLR, 003_*.txt Sect. 4) and negative sampling near the data."""
from bank.client import MemoryBank
from bank.shard import STRATEGIES, BankShard, BankStateError

__all__ = ["MemoryBank", "BankShard", "BankStateError", "STRATEGIES"]
