"""A local S3 service (moto's server) for tests of remote storage: the s3:// branch of
`caffeonspark.storage` is pyarrow's filesystem layer, the same one hdfs:// goes through."""

import contextlib
import logging
import uuid
from pathlib import Path

from moto.server import ThreadedMotoServer

KEY, SECRET = "caffe", "not-a-real-secret"


class LocalS3:
    """A running server and one bucket; `uri(path)` names an object in it, with the endpoint
    and the credentials carried by the URI itself (no environment needed by workers)."""

    def __init__(self, server, bucket):
        self.server = server
        self.bucket = bucket
        host, port = server.get_host_and_port()
        self.endpoint = f"{host}:{port}"

    def uri(self, path=""):
        query = f"endpoint_override={self.endpoint}&scheme=http&region=us-east-1"
        return f"s3://{KEY}:{SECRET}@{self.bucket}/{path.lstrip('/')}?{query}"

    def filesystem(self):
        from pyarrow import fs

        return fs.S3FileSystem(
            access_key=KEY,
            secret_key=SECRET,
            endpoint_override=self.endpoint,
            scheme="http",
            region="us-east-1",
            allow_bucket_creation=True,
        )

    def upload_folder(self, local, path):
        """Copy the files of a local folder (e.g. an LMDB) to bucket/path, written straight
        through pyarrow so the code under test is not used to set up its own input."""
        fs = self.filesystem()
        for f in sorted(Path(local).iterdir()):
            with fs.open_output_stream(f"{self.bucket}/{path}/{f.name}") as out:
                out.write(f.read_bytes())

    def names(self, path):
        """Object names directly under bucket/path."""
        from pyarrow import fs

        infos = self.filesystem().get_file_info(fs.FileSelector(f"{self.bucket}/{path}"))
        return sorted(i.base_name for i in infos)


@contextlib.contextmanager
def local_s3():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        s3 = LocalS3(server, f"models-{uuid.uuid4().hex[:8]}")
        s3.filesystem().create_dir(s3.bucket)
        yield s3
    finally:
        server.stop()
