"""Everything on the bus: subject encoding, the service's publisher and subscriber, and the
client other processes use to follow changes (`ChangeListener`)."""

from events.listener import Change, ChangeListener, UnknownChange, decode_change

__all__ = [
    "Change",
    "ChangeListener",
    "UnknownChange",
    "decode_change",
]
