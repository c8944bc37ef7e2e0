"""The fake PDS, relay and PLC (`tests/fake_pds.py`, `tests/fake_repo.py`): real repos by the spec,
real HTTP, faults.

The MST is checked against the reference implementation's published root CIDs and the spec's
key depths, and every generated CAR is read back with libipld and an independent MST walker.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import cbrrr
import httpx
import libipld
import pytest

from indexer.workload import FOLLOW, LIKE, POST, PROFILE, REPOST
from tests.fake_pds import (
    GET_REPO,
    LATEST_COMMIT,
    LIST_REPOS,
    RESET,
    FakeNetwork,
    FakePds,
    make_network,
)
from tests.fake_repo import FakeRepo, atproto_json, build_mst, key_depth

DAG_CBOR_SHA256 = b"\x01\x71\x12\x20"  # CIDv1, dag-cbor, sha2-256, 32 bytes
EMPTY_MST = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"
# The leaf value of the reference implementation's interop tests.
CID1 = cbrrr.CID.decode("bafyreie5cvv4h45feadgeuwhbcutmh6t2ceseocckahdoe6uat64zmz454")

# The spec's examples (atproto.com/specs/repository), then the layers the reference
# implementation's tests (@atproto/repo, tests/mst.test.ts) note for their keys.
KEY_DEPTHS = [
    ("2653ae71", 0),
    ("blue", 1),
    ("app.bsky.feed.post/454397e440ec", 4),
    ("app.bsky.feed.post/9adeb165882c", 8),
    ("com.example.record/3jqfcqzm3fo2j", 0),
    ("com.example.record/3jqfcqzm3fs2j", 1),
    ("com.example.record/3jqfcqzm3fx2j", 2),
    ("com.example.record/3jqfcqzm4fd2j", 1),
]

# Root CIDs of key sets (every value CID1) from @atproto/repo tests/mst.test.ts: "Known Maps"
# and the "Edge Cases" (a tree trimmed on delete, a split two layers down, layers skipped).
_SPLIT = "3fo2j 3fp2j 3fr2j 3fs2j 3ft2j 3fz2j 4fc2j 4fd2j 4ff2j 4fg2j 4fh2j"
KNOWN_ROOTS = [
    ("", EMPTY_MST),
    ("3fo2j", "bafyreibj4lsc3aqnrvphp5xmrnfoorvru4wynt6lwidqbm2623a6tatzdu"),
    ("3fx2j", "bafyreih7wfei65pxzhauoibu3ls7jgmkju4bspy4t2ha2qdjnzqvoy33ai"),
    (
        "3fp2j 3fr2j 3fs2j 3ft2j 4fc2j",
        "bafyreicmahysq4n6wfuxo522m6dpiy7z7qzym3dzs756t5n7nfdgccwq7m",
    ),
    (
        "3fn2j 3fo2j 3fp2j 3fs2j 3ft2j 3fu2j",
        "bafyreifnqrwbk6ffmyaz5qtujqrzf5qmxf7cbxvgzktl4e3gabuxbtatv4",
    ),
    (
        "3fn2j 3fo2j 3fp2j 3ft2j 3fu2j",
        "bafyreie4kjuxbwkhzg2i5dljaswcroeih4dgiqq6pazcmunwt2byd725vi",
    ),
    (_SPLIT, "bafyreiettyludka6fpgp33stwxfuwhkzlur6chs4d2v4nkmq2j3ogpdjem"),
    (_SPLIT + " 3fx2j", "bafyreid2x5eqs4w4qxvc5jiwda4cien3gw2q6cshofxwnvv7iucrmfohpm"),
    ("3ft2j 3fz2j", "bafyreidfcktqnfmykz2ps3dbul35pepleq7kvv526g47xahuz3rqtptmky"),
    ("3ft2j 3fx2j 3fz2j", "bafyreiavxaxdz7o7rbvr3zg2liox2yww46t7g6hkehx4i4h3lwudly7dhy"),
    ("3ft2j 3fx2j 3fz2j 4fd2j", "bafyreig4jv3vuajbsybhyvb7gggvpwh2zszwfyttjrj6qwvcsp24h6popu"),
]


# --- an independent reader: CAR framing, then the MST walked from the commit ------------------


def depth(key: bytes) -> int:
    """Leading zero bits of SHA-256, halved: counted on the bit string, not as fake_pds does."""
    bits = "".join(f"{byte:08b}" for byte in hashlib.sha256(key).digest())
    return (len(bits) - len(bits.lstrip("0"))) // 2


def read_car(data: bytes) -> tuple[dict[str, Any], list[tuple[bytes, bytes]]]:
    """The header and the raw (CID, block) pairs of a CARv1, in order."""

    def varint(position: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = data[position]
            position += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value, position

    length, position = varint(0)
    header = libipld.decode_dag_cbor(data[position : position + length])
    position += length
    blocks = []
    while position < len(data):
        length, position = varint(position)
        blocks.append((data[position : position + 36], data[position + 36 : position + length]))
        position += length
    return header, blocks


def walk(blocks: dict[bytes, Any], cid: bytes, layer: int | None = None) -> Iterator[tuple]:
    """`(key, value CID)` of every entry under node `cid`, in key order, checking as it goes
    that each node is well formed, prefix-compressed and on its layer (one below its parent)."""
    node = blocks[cid]
    assert set(node) == {"l", "e"}
    previous = b""
    keys = []
    for entry in node["e"]:
        assert set(entry) == {"p", "k", "v", "t"}
        key = previous[: entry["p"]] + entry["k"]
        shared = [a == b for a, b in zip(previous, key, strict=False)] + [False]
        assert entry["p"] == shared.index(False), "prefix not shared, or not all of it"
        keys.append(key)
        previous = key
    if layer is None:  # the root: its keys say its layer
        layer = depth(keys[0]) if keys else 0
    assert all(depth(key) == layer for key in keys), "a key is on the wrong layer"
    assert layer > 0 or node["l"] is None
    if node["l"] is not None:
        yield from walk(blocks, node["l"], layer - 1)
    for key, entry in zip(keys, node["e"], strict=True):
        yield key, entry["v"]
        if entry["t"] is not None:
            assert layer > 0
            yield from walk(blocks, entry["t"], layer - 1)


def check_repo(repo: FakeRepo) -> dict[str, Any]:
    """Read the repo's CAR as a client would and check it against the repo; the commit."""
    data = repo.car()
    header, raw = read_car(data)
    decoded_header, blocks = libipld.decode_car(data)
    assert header == decoded_header == {"version": 1, "roots": [raw[0][0]]}
    for cid, block in raw:
        assert cid == DAG_CBOR_SHA256 + hashlib.sha256(block).digest()
    assert len(blocks) == len(raw), "a block is in the CAR twice"
    assert libipld.encode_cid(raw[0][0]) == repo.commit_cid
    commit = blocks[raw[0][0]]
    assert set(commit) == {"did", "version", "data", "rev", "prev", "sig"}
    assert (commit["did"], commit["version"], commit["rev"]) == (repo.did, 3, repo.rev)
    assert commit["prev"] is None
    assert len(commit["sig"]) == 64
    walked = list(walk(blocks, commit["data"]))
    keys = [key for key, _ in walked]
    assert keys == sorted(set(keys)), "keys out of order or repeated"
    expected = {
        f"{c}/{r}".encode(): DAG_CBOR_SHA256 + hashlib.sha256(cbrrr.encode_dag_cbor(v)).digest()
        for (c, r), v in repo.records.items()
    }
    assert dict(walked) == expected
    records = dict(raw)
    for (c, r), record in repo.records.items():
        block = records[dict(walked)[f"{c}/{r}".encode()]]
        assert cbrrr.decode_dag_cbor(block, atjson_mode=True) == atproto_json(record)
    return commit


def record_key(suffixes: str) -> dict[bytes, cbrrr.CID]:
    return {f"com.example.record/3jqfcqzm{s}".encode(): CID1 for s in suffixes.split()}


# --- the MST ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "layer"), KEY_DEPTHS)
def test_key_depth_follows_the_spec(key: str, layer: int) -> None:
    assert key_depth(key.encode()) == layer
    assert depth(key.encode()) == layer  # the walker's own count agrees


@pytest.mark.parametrize(("suffixes", "root"), KNOWN_ROOTS)
def test_mst_root_matches_the_reference_implementation(suffixes: str, root: str) -> None:
    entries = record_key(suffixes)
    cid, nodes = build_mst(entries)
    assert cid.encode() == root
    assert nodes[0][0] == cid  # root first
    blocks = {c.cid_bytes: libipld.decode_dag_cbor(data) for c, data in nodes}
    walked = dict(walk(blocks, cid.cid_bytes))
    assert walked == {key: value.cid_bytes for key, value in entries.items()}


def test_mst_does_not_depend_on_insertion_order() -> None:
    records = {("app.bsky.feed.like", f"3k{n:011d}"): {"n": n} for n in range(300)}
    cars = []
    for seed in (1, 2):
        repo = FakeRepo("did:plc:order", clock_id=7)
        items = list(records.items())
        random.Random(seed).shuffle(items)
        for (collection, rkey), record in items:
            repo.put(collection, rkey, record)
        cars.append(repo.car())
    assert cars[0] == cars[1]


# --- repos ------------------------------------------------------------------------------------


def test_empty_repo_is_a_commit_and_an_empty_node() -> None:
    repo = FakeRepo("did:plc:empty")
    commit = check_repo(repo)
    assert libipld.encode_cid(commit["data"]) == EMPTY_MST
    _, raw = read_car(repo.car())
    assert len(raw) == 2
    assert libipld.decode_dag_cbor(raw[1][1]) == {"l": None, "e": []}


def test_generated_repo_reads_back_whole() -> None:
    network = make_network(n_repos=3, records_per_repo=400, n_pdses=1, seed=5)
    layers = []
    for repo in network.repos.values():
        commit = check_repo(repo)
        blocks = libipld.decode_car(repo.car())[1]
        root_keys = [e["k"] for e in blocks[commit["data"]]["e"]]
        layers.append(depth(root_keys[0]))
        assert len(repo.records) == 400
    assert max(layers) >= 3, "too shallow a tree to test the layers"


def test_put_and_delete_move_the_rev_and_the_tree() -> None:
    repo = FakeRepo("did:plc:changes", clock_id=3)
    revs = [repo.rev]
    revs.append(repo.put(POST, "3kaaaaaaaaaa2", {"$type": POST, "text": "one"}))
    revs.append(repo.put(POST, "3kaaaaaaaaab2", {"$type": POST, "text": "two"}))
    first = repo.commit_cid
    revs.append(repo.put(POST, "3kaaaaaaaaaa2", {"$type": POST, "text": "edited"}))
    assert repo.commit_cid != first
    check_repo(repo)
    revs.append(repo.delete(POST, "3kaaaaaaaaab2"))
    assert revs == sorted(set(revs)) and repo.rev == revs[-1]
    assert check_repo(repo)["rev"] == revs[-1]
    assert repo.expected() == {
        repo.uri(POST, "3kaaaaaaaaaa2"): repo.record_cid(POST, "3kaaaaaaaaaa2")
    }
    with pytest.raises(KeyError):
        repo.delete(POST, "3kaaaaaaaaab2")
    with pytest.raises(ValueError, match="must increase"):
        repo.put(POST, "x", {"text": "stale"}, time_us=1)
    later = repo.put(POST, "x", {"text": "at a time"}, time_us=2_000_000_000_000_000)
    assert later > revs[-1]


def test_records_keep_links_and_bytes_apart() -> None:
    blob = cbrrr.CID.cidv1_raw_sha256_32_from(b"image")
    record = {"embed": {"image": {"$type": "blob", "ref": blob, "size": 5}}, "extra": b"\x00\x01"}
    expected = {
        "embed": {"image": {"$type": "blob", "ref": {"$link": blob.encode()}, "size": 5}},
        "extra": {"$bytes": "AAE"},
    }
    assert atproto_json(record) == expected
    repo = FakeRepo("did:plc:links")
    repo.put(POST, "3kaaaaaaaaaa2", record)
    assert repo.json_records() == {repo.uri(POST, "3kaaaaaaaaaa2"): expected}
    check_repo(repo)  # the block decodes (cbrrr, atjson) to the same JSON


# --- the generated network --------------------------------------------------------------------


def links_in(value: Any) -> Iterator[Any]:
    """Every CID link and byte string inside a record."""
    if isinstance(value, cbrrr.CID | bytes):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from links_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from links_in(item)


def test_network_records_point_at_real_records() -> None:
    network = make_network(n_repos=12, records_per_repo=40, n_pdses=3, seed=9)
    repos = network.repos
    cids = {uri: cid for expected in network.expected().values() for uri, cid in expected.items()}
    assert len(cids) == 12 * 40
    kinds: dict[str, int] = {}
    foreign_likes = 0
    for did, repo in repos.items():
        records = repo.records
        assert records[PROFILE, "self"]["$type"] == PROFILE
        follows = [r["subject"] for (c, _), r in records.items() if c == FOLLOW]
        assert len(follows) == len(set(follows)) and did not in follows
        assert set(follows) <= set(repos)
        for (collection, _), record in records.items():
            kinds[collection] = kinds.get(collection, 0) + 1
            assert record["$type"] == collection
            refs = [record["subject"]] if collection in (LIKE, REPOST) else []
            refs += list(record.get("reply", {}).values())
            for ref in refs:
                assert cids[ref["uri"]] == ref["cid"], "a strong ref to a missing record"
                assert ref["uri"].split("/")[3] == POST
                foreign_likes += not ref["uri"].startswith(f"at://{did}/")
    assert kinds[POST] > 50 and kinds[LIKE] > 50 and kinds[FOLLOW] > 10 and kinds[REPOST] > 5
    assert foreign_likes > 50
    found = [v for repo in repos.values() for r in repo.records.values() for v in links_in(r)]
    blobs = [v for v in found if isinstance(v, cbrrr.CID)]
    assert len(blobs) > 10 and all(b.cid_bytes[:2] == b"\x01\x55" for b in blobs)  # raw
    assert any(isinstance(v, bytes) for v in found)
    assert [len(pds.repos) for pds in network.pdses] == [4, 4, 4]


def test_network_is_deterministic_by_seed() -> None:
    def heads(seed: int) -> list[str]:
        network = make_network(n_repos=4, records_per_repo=25, n_pdses=2, seed=seed)
        return [repo.commit_cid for repo in network.repos.values()]

    assert heads(3) == heads(3)
    assert heads(3) != heads(4)


# --- the servers ------------------------------------------------------------------------------


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(trust_env=False, timeout=10)


@pytest.fixture
async def network() -> Any:
    async with make_network(n_repos=10, records_per_repo=12, n_pdses=3, seed=2) as started:
        yield started


async def test_plc_names_each_account_pds(network: FakeNetwork) -> None:
    async with client() as http:
        for did, repo in network.repos.items():
            answer = await http.get(f"{network.plc.url}/{quote(did)}")
            assert answer.status_code == 200
            document = answer.json()
            assert document["id"] == did
            assert document["alsoKnownAs"] == [f"at://{repo.handle}"]
            [service] = document["service"]
            assert service["id"] == "#atproto_pds"
            assert service["type"] == "AtprotoPersonalDataServer"
            assert service["serviceEndpoint"] == network.pds_of(did).url
        missing = await http.get(f"{network.plc.url}/did:plc:nobody")
    assert missing.status_code == 404
    assert network.plc.count("did-document") == 11


async def test_get_repo_from_pds_and_relay(network: FakeNetwork) -> None:
    did, repo = next(iter(network.repos.items()))
    home = network.pds_of(did)
    elsewhere = next(pds for pds in network.pdses if pds is not home)
    params = {"did": did}
    async with client() as http:
        answers = [
            await http.get(f"{server.url}/xrpc/{GET_REPO}", params=params)
            for server in (home, network.relay, elsewhere)
        ]
        latest = await http.get(f"{home.url}/xrpc/{LATEST_COMMIT}", params=params)
        no_did = await http.get(f"{home.url}/xrpc/{GET_REPO}")
        repo.status = "takendown"
        taken = await http.get(f"{home.url}/xrpc/{GET_REPO}", params=params)
    for answer in answers[:2]:
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "application/vnd.ipld.car"
        assert answer.content == repo.car()
    assert answers[2].status_code == 400
    assert answers[2].json()["error"] == "RepoNotFound"
    assert latest.json() == {"cid": repo.commit_cid, "rev": repo.rev}
    assert (no_did.status_code, no_did.json()["error"]) == (400, "InvalidRequest")
    assert (taken.status_code, taken.json()["error"]) == (400, "RepoTakendown")
    assert (home.count(GET_REPO, did), home.count(GET_REPO), elsewhere.count(GET_REPO)) == (2, 3, 1)


async def list_all(url: str, limit: int) -> list[dict[str, Any]]:
    """Every page of listRepos; each page but the last names a cursor."""
    pages: list[dict[str, Any]] = []
    async with client() as http:
        while not pages or "cursor" in pages[-1]:
            params = {"limit": limit} | ({"cursor": pages[-1]["cursor"]} if pages else {})
            answer = await http.get(f"{url}/xrpc/{LIST_REPOS}", params=params)
            assert answer.status_code == 200
            pages.append(answer.json())
    return pages


async def test_list_repos_pages_cover_every_repo_once(network: FakeNetwork) -> None:
    pages = await list_all(network.relay.url, 3)
    assert [len(page["repos"]) for page in pages] == [3, 3, 3, 1]
    listed = [entry for page in pages for entry in page["repos"]]
    assert [entry["did"] for entry in listed] == sorted(network.repos)
    for entry in listed:
        repo = network.repos[entry["did"]]
        assert entry == {"did": repo.did, "head": repo.commit_cid, "rev": repo.rev, "active": True}
    pds = network.pdses[0]
    pds.cursor_on_last_page = True
    own = await list_all(pds.url, 2)
    assert [len(page["repos"]) for page in own] == [2, 2, 0]  # 4 repos: a cursor, then nothing
    assert sorted(e["did"] for page in own for e in page["repos"]) == sorted(pds.repos)
    async with client() as http:
        bad = await http.get(f"{pds.url}/xrpc/{LIST_REPOS}", params={"limit": 0})
    assert bad.status_code == 400


async def test_failures_are_served_in_order(network: FakeNetwork) -> None:
    did, other = list(network.repos)[:2]
    pds = network.relay
    pds.fail(did, [429, 500, RESET, 503], retry_after=2)
    url = f"{pds.url}/xrpc/{GET_REPO}"
    statuses: list[int | str] = []
    async with client() as http:
        assert (await http.get(url, params={"did": other})).status_code == 200  # not scripted
        for _ in range(5):
            try:
                answer = await http.get(url, params={"did": did})
            except httpx.TransportError:
                statuses.append(RESET)
                continue
            statuses.append(answer.status_code)
            if answer.status_code == 429:
                assert answer.headers["retry-after"] == "2"
            elif answer.status_code >= 500:
                assert answer.json()["error"] in ("InternalServerError", "ServiceUnavailable")
    assert statuses == [429, 500, RESET, 503, 200]
    assert answer.content == network.repos[did].car()
    assert pds.count(GET_REPO, did) == 5 and pds.pending_faults(did) == 0
    assert [hit.status for hit in pds.hits if hit.did == did] == [429, 500, None, 503, 200]


async def test_arrival_times_show_a_client_waiting(network: FakeNetwork) -> None:
    pds = network.pdses[1]
    did = next(iter(pds.repos))
    pds.fail(did, [429], retry_after=1)
    async with client() as http:
        first = await http.get(f"{pds.url}/xrpc/{GET_REPO}", params={"did": did})
        await asyncio.sleep(float(first.headers["retry-after"]) / 4)
        await http.get(f"{pds.url}/xrpc/{GET_REPO}", params={"did": did})
    arrived = pds.arrivals(GET_REPO, did)
    assert len(arrived) == 2 and arrived[1] - arrived[0] >= 0.25


async def test_in_flight_maximum_is_measured(network: FakeNetwork) -> None:
    pds = network.pdses[2]
    dids = list(pds.repos)
    pds.delay = 0.3
    async with client() as http:
        url = f"{pds.url}/xrpc/{GET_REPO}"
        await asyncio.gather(*(http.get(url, params={"did": did}) for did in dids))
        assert pds.max_in_flight == len(dids) == 3
        pds.reset_stats()
        for did in dids:
            await http.get(url, params={"did": did})
    assert pds.max_in_flight == 1 and pds.in_flight == 0
    assert pds.count(GET_REPO) == 3


async def test_keep_alive_and_connection_close(network: FakeNetwork) -> None:
    pds = network.pdses[0]
    url = f"{pds.url}/xrpc/{LATEST_COMMIT}"
    did = next(iter(pds.repos))
    async with client() as http:
        for _ in range(3):
            answer = await http.get(url, params={"did": did})
            assert answer.headers["connection"] == "keep-alive"
        assert pds.connections == 1
        pds.keep_alive = False
        for _ in range(3):
            answer = await http.get(url, params={"did": did})
            assert answer.headers["connection"] == "close"
    assert pds.connections == 3  # the first close went over the open connection


def test_blocking_clients_are_served_too() -> None:
    # The servers run in their own threads, so a test may block (a subprocess run, say).
    repo = FakeRepo("did:plc:blocking")
    repo.put(POST, "3kaaaaaaaaaa2", {"$type": POST, "text": "hi"})
    with FakePds([repo]) as pds, httpx.Client(trust_env=False) as http:
        answer = http.get(f"{pds.url}/xrpc/{GET_REPO}", params={"did": repo.did})
        assert answer.content == repo.car()
        url = pds.url
    with pytest.raises(httpx.ConnectError), httpx.Client(trust_env=False) as http:
        http.get(f"{url}/xrpc/{GET_REPO}", params={"did": repo.did})
    with pds, httpx.Client(trust_env=False) as http:  # back after an outage, at the same URL
        assert pds.url == url
        assert http.get(f"{url}/xrpc/{GET_REPO}", params={"did": repo.did}).status_code == 200
