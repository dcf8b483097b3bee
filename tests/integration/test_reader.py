"""Reading a checkpoint file once: what `reader.read_verified` deserialises equals what torch.load
reads from the same file, and a damaged byte anywhere (tensor data, pickle, zip headers, central
directory) stops it before anything is deserialised. Real files written by torch.save."""

import collections
import io
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch.utils.serialization import config as serialization

from telepathy.checkpoint.hashing import HashingFile, hash_file
from telepathy.checkpoint.reader import NotAZip, read_verified, zip_records
from tests.support import RNG

CHUNK = 4096


def tricky_state():
    """What DeepSpeed's files hold, and the cases that trip a hand-made loader: views sharing a
    storage, several dtypes, an empty tensor, a 0-dim tensor, a non-contiguous view, torch.Size."""
    base = torch.arange(3000, dtype=torch.float32)
    return {
        "flat": base,
        "view": base[100:200],
        "strided": base.view(30, 100)[:, ::3],
        "bf16": torch.randn(777).to(torch.bfloat16),
        "ids": torch.arange(50, dtype=torch.int64),
        "empty": torch.empty(0),
        "scalar": torch.tensor(3.5),
        "nested": collections.OrderedDict(a=[torch.ones(5), (torch.zeros(2, 2), 7)], b="text"),
        "shapes": {"w": torch.Size([4, 5])},
        "big": torch.randn(5000),
        "last": torch.empty(0, dtype=torch.bfloat16),  # the last record empty, as in ZeRO-3 files
    }


def same(a, b):
    if torch.is_tensor(a):
        return (torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape
                and a.stride() == b.stride() and torch.equal(a, b))
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(params=["telepathy writer (CRC off)", "torch.save to a path (CRC on)"])
def saved(request, tmp_path):
    path = tmp_path / "state.pt"
    state = tricky_state()
    if request.param.startswith("telepathy"):
        before = serialization.save.compute_crc32
        serialization.save.compute_crc32 = False
        try:
            with ThreadPoolExecutor(2) as pool:
                f = HashingFile(path, pool, chunk_bytes=CHUNK)
                torch.save(state, f)
                entry = f.close()
        finally:
            serialization.save.compute_crc32 = before
    else:
        torch.save(state, path)
        entry = hash_file(path, chunk_bytes=CHUNK)
    return path, entry


def test_one_read_gives_what_torch_load_gives(saved):
    path, entry = saved
    verified, problems = read_verified(path, entry)
    assert problems == [] and verified is not None
    got = verified.load("cpu")
    want = torch.load(path, weights_only=False)
    assert same(got, want)
    # views still share one storage, as torch.load makes them
    assert got["view"].untyped_storage().data_ptr() == got["flat"].untyped_storage().data_ptr()
    # every other record as torch's own reader reads it (the serialization id sits after the
    # last, empty, tensor record)
    torch_reader = torch._C.PyTorchFileReader(str(path))
    for name in torch_reader.get_all_records():
        if not name.startswith("data/"):
            assert verified.get_record(name) == torch_reader.get_record(name), name
    assert verified.serialization_id() == torch_reader.serialization_id() != ""
    # and nothing is left mapped from the file: the tensors live in memory of their own
    with open("/proc/self/maps") as maps:
        assert str(path) not in maps.read()


def region_offsets(path):
    """One offset inside each kind of region of a torch zip file."""
    records = {r.name: r for r in zip_records(path)}
    with zipfile.ZipFile(path) as z:
        infos = {i.filename.split("/", 1)[1]: i for i in z.infolist()}
        directory = z.start_dir
    big = records["data/" + str(max(
        (int(n.split("/")[1]) for n in records if n.startswith("data/")),
        key=lambda k: records[f"data/{k}"].size))]
    return {
        "tensor data": big.offset + RNG.randrange(big.size),
        "pickle": records["data.pkl"].offset + RNG.randrange(records["data.pkl"].size),
        "local header": infos["data.pkl"].header_offset + 14,  # the CRC-32 field
        "central directory": directory + RNG.randrange(os.path.getsize(path) - directory),
    }


@pytest.mark.parametrize("region", ["tensor data", "pickle", "local header", "central directory"])
def test_a_flipped_bit_anywhere_stops_the_read_before_anything_is_deserialised(saved, region):
    path, entry = saved
    at = region_offsets(path)[region]
    data = bytearray(path.read_bytes())
    data[at] ^= 1 << RNG.randrange(8)
    path.write_bytes(bytes(data))
    try:
        verified, problems = read_verified(path, entry)
    except NotAZip:  # a directory too damaged to parse: the caller verifies the ordinary way
        assert region == "central directory"
        return
    assert verified is None  # nothing to deserialise
    start = at // CHUNK * CHUNK
    assert problems == [f"{path.name}: bytes {start}-{min(start + CHUNK, entry['size']) - 1} have "
                        f"xxh3_128 {problems[0].split()[5].rstrip(',')}, manifest says "
                        f"{entry['chunks'][at // CHUNK]}"], problems


def test_a_flipped_bit_in_the_directorys_version_field_is_not_a_crash(saved):
    """zipfile raises NotImplementedError (not BadZipFile) for a "version needed to extract" it
    does not know: 2.0 with bit 6 flipped reads as 8.4."""
    path, entry = saved
    with zipfile.ZipFile(path) as z:
        directory = z.start_dir
    data = bytearray(path.read_bytes())
    data[directory + 6] ^= 0x40  # the first directory entry's "version needed" (low byte)
    path.write_bytes(bytes(data))
    with pytest.raises(NotAZip, match="NotImplementedError"):
        read_verified(path, entry)  # the caller then verifies the whole file the ordinary way


def test_a_truncated_file_and_a_legacy_file(tmp_path, saved):
    path, entry = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    verified, problems = read_verified(path, entry)
    assert verified is None and problems == [
        f"{path.name}: size {len(data) // 2} bytes, manifest says {len(data)}"]
    legacy = tmp_path / "legacy.pt"
    torch.save({"x": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(NotAZip):
        read_verified(legacy, hash_file(legacy, chunk_bytes=CHUNK))
    text = tmp_path / "state.json"
    text.write_bytes(io.BytesIO(b'{"step": 1}').read())
    with pytest.raises(NotAZip):
        read_verified(text, hash_file(text, chunk_bytes=CHUNK))


def test_the_writer_threads_really_save_without_the_zip_crc(tmp_path):
    """torch's serialization config is per thread: telepathy's writer turns the CRC-32 off on
    the thread that saves (set on the main thread only, it never applied there). The records
    of what it writes carry no CRC, and torch.load reads them all the same."""
    from telepathy.checkpoint.writer import Writer
    state = tricky_state()
    writer = Writer(serialization_zip=True)  # what DeepSpeed asks for by default
    writer.submit_state("state.pt", state, tmp_path / "state.pt")
    (name, future), = writer.take_jobs()
    entry = future.result()
    with zipfile.ZipFile(tmp_path / "state.pt") as z:
        crcs = {i.filename.split("/", 1)[1]: i.CRC for i in z.infolist()}
    assert {n: c for n, c in crcs.items() if n.startswith("data/") and c != 0} == {}
    assert same(torch.load(tmp_path / "state.pt", weights_only=False), state)
    verified, problems = read_verified(tmp_path / "state.pt", entry)
    assert problems == [] and same(verified.load("cpu"), state)
