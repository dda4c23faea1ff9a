"""A standard gRPC client (Python grpcio) dials an agent through a ringpeer
proxy's peer port, using only proto/proxyservice.proto (Teleport's proxy
peering API). Exit 0 on success; prints what failed otherwise.

usage: grpc_dial.py PEER_ADDR CERTS_DIR PROXY_NAME AGENT SERVICE
"""
import os
import sys
import tempfile

import grpc
from grpc_tools import protoc

addr, certs, name, agent, service = sys.argv[1:6]
proto_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "proto")
out = tempfile.mkdtemp()
if protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={out}", f"--grpc_python_out={out}", "proxyservice.proto"]) != 0:
    sys.exit("protoc failed")
sys.path.insert(0, out)
import proxyservice_pb2 as pb  # noqa: E402
import proxyservice_pb2_grpc as rpc  # noqa: E402


def read(f):
    with open(os.path.join(certs, f), "rb") as fh:
        return fh.read()


creds = grpc.ssl_channel_credentials(read("ca.pem"), read(f"{name}-key.pem"), read(f"{name}.pem"))
channel = grpc.secure_channel(addr, creds)
stub = rpc.ProxyServiceStub(channel)
stub.Ping(pb.ProxyServicePingRequest(), timeout=10)

payload = b"hello from grpcio " * 1000


def frames():
    yield pb.Frame(DialRequest=pb.DialRequest(NodeID=agent, TunnelType=service))
    for i in range(0, len(payload), 4096):
        yield pb.Frame(Data=pb.Data(Bytes=payload[i : i + 4096]))


# A peer proxy says which client it dials for (ringpeer-client-id); the
# serving proxy checks its own grants for that client.
md = (("ringpeer-client-id", "spiffe://demo/client/client"),)
# Without it, the serving proxy refuses the dial.
try:
    list(stub.DialNode(frames(), timeout=10))
    sys.exit("a peer dial without ringpeer-client-id succeeded")
except grpc.RpcError as e:
    if e.code() != grpc.StatusCode.PERMISSION_DENIED:
        sys.exit(f"no client identity: expected PERMISSION_DENIED, got {e.code()} {e.details()}")
replies = list(stub.DialNode(frames(), timeout=20, metadata=md))
if not replies or replies[0].WhichOneof("Message") != "ConnectionEstablished":
    sys.exit(f"first reply is not ConnectionEstablished: {replies[:1]}")
echoed = b"".join(f.Data.Bytes for f in replies[1:])
if echoed != payload:
    sys.exit(f"echo mismatch: {len(echoed)} bytes back, {len(payload)} sent")

# An unknown agent is a clean gRPC error, not a hang.
try:
    list(stub.DialNode(iter([pb.Frame(DialRequest=pb.DialRequest(NodeID="nobody"))]), timeout=10, metadata=md))
    sys.exit("dial to an unknown agent succeeded")
except grpc.RpcError as e:
    if e.code() != grpc.StatusCode.NOT_FOUND:
        sys.exit(f"unknown agent: expected NOT_FOUND, got {e.code()} {e.details()}")
print("ok")
