"""A CSI driver under test: real store, real socket, real mounts, and a kubelet-like client.

Used by tests/integration/test_csi.py and bench/csi.py. ``CsiEnv`` lives in a short directory
under /tmp (unix socket paths are limited to 107 bytes) and ``close`` unmounts everything below
it, even after a failed test.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpc import aio

from cacheagent._proto.csi.v1 import csi_pb2 as pb
from cacheagent._proto.csi.v1 import csi_pb2_grpc as pb_grpc
from cacheagent.csi import CsiServer, start_csi_server
from cacheagent.store import Store
from tests.csi_backend import StoreBackend, model_ref
from tests.mounts import force_unmount, mounts_under

DRIVER = "models.cacheagent.io"
NODE = "node-a"

AccessMode = pb.VolumeCapability.AccessMode


def mount_capability(mode: AccessMode.Mode.ValueType = AccessMode.SINGLE_NODE_WRITER) -> Any:
    return pb.VolumeCapability(
        mount=pb.VolumeCapability.MountVolume(),
        access_mode=AccessMode(mode=mode),
    )


def publish_request(
    volume_id: str, target: Path | str, model: str | None = "m1", **attributes: str
) -> pb.NodePublishVolumeRequest:
    context = {"model": model_ref(model)} if model is not None else {}
    context.update(attributes)
    return pb.NodePublishVolumeRequest(
        volume_id=volume_id,
        target_path=str(target),
        volume_capability=mount_capability(),
        readonly=True,
        volume_context=context,
    )


@dataclass
class CsiEnv:
    root: Path
    store: Store
    backend: StoreBackend
    server: CsiServer | None = None
    channel: aio.Channel | None = None
    operations: list[tuple[str, str, float]] = field(default_factory=list)

    @classmethod
    def create(cls) -> CsiEnv:
        root = Path(tempfile.mkdtemp(prefix="csi-", dir="/tmp"))
        (root / "kubelet" / "pods").mkdir(parents=True)
        store = Store.open(root / "store")
        return cls(root=root, store=store, backend=StoreBackend(store))

    @property
    def kubelet(self) -> Path:
        return self.root / "kubelet"

    @property
    def socket(self) -> Path:
        return self.root / "plugin" / "csi.sock"

    def target(self, name: str | None = None, *, make_parent: bool = True) -> Path:
        """A target path the way kubelet builds one; its parent exists, the target does not."""
        pod = uuid.uuid4().hex[:8]
        parent = self.kubelet / "pods" / pod / "volumes" / "kubernetes.io~csi" / (name or "model")
        if make_parent:
            parent.mkdir(parents=True)
        return parent / "mount"

    async def start(self, **options: Any) -> CsiServer:
        options.setdefault("publish_wait_seconds", 5.0)
        self.server = await start_csi_server(
            self.socket,
            DRIVER,
            options.pop("node_id", NODE),
            options.pop("kubelet_dir", self.kubelet),
            self.backend,
            store_root=self.root / "store",
            on_operation=lambda *op: self.operations.append(op),
            **options,
        )
        self.channel = aio.insecure_channel(f"unix://{self.socket}")
        return self.server

    @property
    def node(self) -> Any:
        assert self.channel is not None
        return pb_grpc.NodeStub(self.channel)

    @property
    def identity(self) -> Any:
        assert self.channel is not None
        return pb_grpc.IdentityStub(self.channel)

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close(None)
            self.channel = None
        if self.server is not None:
            await self.server.stop(None)
            self.server = None

    def reopen_store(self) -> None:
        """Throw the store and backend away and open new ones over the same directory."""
        self.store.close()
        self.store = Store.open(self.root / "store")
        self.backend = StoreBackend(self.store)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.stop()
        await self.backend.aclose()
        for _ in range(8):
            left = mounts_under(self.root)
            if not left:
                break
            for point in reversed(left):
                force_unmount(point)
        self.store.close()
        shutil.rmtree(self.root, ignore_errors=True)
