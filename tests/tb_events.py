"""Reading the TensorBoard event files a run writes (TFRecord framing), for the tests."""

import os
import struct


def read_events(directory):
    """TensorBoard event records of ``directory`` (TFRecord framing) -> scalars and image tags."""
    from tensorboardX.proto.event_pb2 import Event

    scalars, images = {}, set()
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("image"):
                    images.add(value.tag)
                else:
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars, images
