"""Reading strangers' bytes safely, and writing files atomically: the layer every reader of
untrusted input stands on (image folders, poison files, setup files, result stores).

- :mod:`epic.io.files`: the one opener of untrusted files (a regular file, size-capped, a
  planted link refused), JSON read with named errors, atomic writes.
- :mod:`epic.io.safe_pickle`: restricted unpickling (numpy arrays, numbers, strings, containers)
  and ``torch.load`` of weights only.
- :mod:`epic.io.npy`: arrays of ``.npz`` files, sizes checked from their headers before a byte
  of data is read, object arrays never unpickled.
"""
