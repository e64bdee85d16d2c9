"""Hooks around the life of a tus upload, in the spirit of tusd's.

Six moments, each a method that may be plain or ``async``:

* ``pre_create`` -- before an upload is created (no file exists yet; for a final
  concatenation, after the parts were checked). May reject (raise ``UploadError``) or
  return new metadata (a mapping).
* ``post_create`` -- the upload exists (before a creation-with-upload body is stored).
* ``post_receive`` -- a request's bytes are stored (the offset moved); with the
  handler's ``progress_interval``, also while a body arrives (progress).
* ``pre_finish`` -- every byte is stored, before the file is finished. May reject: the
  upload is removed and the client gets the error's status.
* ``post_finish`` -- the file is complete (final path and sha256 known).
* ``post_terminate`` -- a DELETE removed the upload.

Use them in one of two ways (both can be combined: the handler's methods call the hooks
object by default):

* subclass :class:`~tornado_longconn.upload_tus.TusUploadHandler` and override its
  methods of the same names (``self.request``, ``self.current_user`` are at hand);
* pass a :class:`TusHooks` subclass instance as the handler's ``hooks`` argument
  (each method gets the :class:`UploadInfo` and the request).

A rejection is an :class:`~tornado_longconn.exceptions.UploadError` with the status to
answer (``UploadError("quota exceeded", status=403)``); it is counted in the store's
``stats().hook_rejections``. Any other exception from ``pre_*`` is answered 500. An
exception from a ``post_*`` hook is logged and counted (``stats().hook_errors``); the
client's answer does not change (the upload already happened).

Example::

    class Hooks(TusHooks):
        async def pre_create(self, info, request):
            if "filename" not in info.metadata:
                raise UploadError("filename metadata is required", status=400)
            return {**info.metadata, "owner": request.headers.get("X-User", "")}

        def post_finish(self, info, request):
            log.info("stored %s (%d bytes) at %s", info.id, info.size, info.path)

    routes = TusUploadHandler.routes("/files", store=store, hooks=Hooks())
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping

from tornado.httputil import HTTPServerRequest

from tornado_longconn.upload import UploadInfo, upload_info

__all__ = ["TusHooks", "UploadInfo", "upload_info"]


class TusHooks:
    """Hooks with no effect; subclass and override the ones you need (plain or async).

    See the module documentation for when each one runs and what it may do.
    """

    def pre_create(
        self, info: UploadInfo, request: HTTPServerRequest
    ) -> Mapping[str, str] | Awaitable[Mapping[str, str] | None] | None:
        """Accept (return None), rewrite the metadata (return it) or reject (raise)."""
        return None

    def post_create(self, info: UploadInfo, request: HTTPServerRequest) -> Awaitable[None] | None:
        """The upload was created."""
        return None

    def post_receive(self, info: UploadInfo, request: HTTPServerRequest) -> Awaitable[None] | None:
        """A request's bytes are stored; ``info.offset`` is the new durable offset."""
        return None

    def pre_finish(self, info: UploadInfo, request: HTTPServerRequest) -> Awaitable[None] | None:
        """Every byte is stored (``info.path`` is the partial file); raise to reject."""
        return None

    def post_finish(self, info: UploadInfo, request: HTTPServerRequest) -> Awaitable[None] | None:
        """The file is complete at ``info.path`` with ``info.sha256``."""
        return None

    def post_terminate(
        self, info: UploadInfo, request: HTTPServerRequest
    ) -> Awaitable[None] | None:
        """A DELETE removed the upload."""
        return None
