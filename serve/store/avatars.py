"""Avatars as the owner and the public see them: reads, paginated lists and the feed,
metadata updates, publishing and deletion."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from sqlalchemy import Connection, bindparam, delete, func, select, true, update

from ..vocab import ACTIVE_STATUSES, JOB_KINDS, JOB_STATUSES, SORT_FIELDS, SORT_ORDERS, VISIBILITIES
from ..vocab import AssetDeletionReason, EventType, FeedSort, JobErrorCode, JobStatus, Visibility, values
from .base import StorePart, check_choice, check_limit, page
from .cleanup import upload_prefix
from .jobs import check_tags, to_avatar
from .records import UNSET, Avatar, InvalidArgument, InvalidState, NotPublishable, Page
from .schema import avatars as A, comments, likes

_GET = select(A).where(A.c.id == bindparam("aid"))
_SORT_COLUMNS = {"createdAt": A.c.created_at, "likes": A.c.likes, "comments": A.c.comments, "remixes": A.c.remixes}


class AvatarsStore(StorePart):
    def get_avatar(self, avatar_id: str) -> Avatar | None:
        """The avatar (any owner) or None; the caller checks visibility against `account_id`."""
        row = self.db.read(lambda c: c.execute(_GET, {"aid": avatar_id}).mappings().first())
        return to_avatar(row) if row else None

    def list_avatars(self, account_id: str, *, limit: int = 20, cursor: str | None = None, offset: int | None = None,
                     status: str | None = None, model: str | None = None, visibility: str | None = None,
                     published: bool | None = None, kind: str | None = None, search: str | None = None,
                     sort_by: str = "createdAt", sort_order: str = "desc") -> Page[Avatar]:
        """The account's avatars with keyset pagination (id breaks ties, so pages never repeat
        or skip rows with equal sort values). `search` is a case-insensitive substring of the
        prompt or title. A cursor is only valid with the same sort_by/sort_order (else
        InvalidCursor); filters should also stay the same between pages. `offset` pages by
        position instead (not together with a cursor)."""
        check_limit(limit)
        check_choice(sort_by, SORT_FIELDS, "sortBy")
        check_choice(sort_order, SORT_ORDERS, "sortOrder")
        for param, value, allowed in (("status", status, JOB_STATUSES), ("visibility", visibility, VISIBILITIES),
                                      ("kind", kind, JOB_KINDS)):
            if value is not None:
                check_choice(value, allowed, param)
        stmt = select(A).where(A.c.account_id == account_id)
        for column, value in ((A.c.status, status), (A.c.model, model), (A.c.visibility, visibility),
                              (A.c.kind, kind)):
            if value is not None:
                stmt = stmt.where(column == value)
        if published is not None:
            stmt = stmt.where(A.c.published == bool(published))
        if search:
            escaped = search.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            pattern = f"%{escaped}%"
            stmt = stmt.where(func.lower(func.coalesce(A.c.prompt, "")).like(pattern, escape="\\")
                              | func.lower(func.coalesce(A.c.title, "")).like(pattern, escape="\\"))
        tag = f"{sort_by}~{sort_order}"
        return self.db.read(lambda c: page(c, stmt, _SORT_COLUMNS[sort_by], A.c.id, sort_order, tag, limit, cursor,
                                           to_avatar, offset))

    def update_avatar(self, avatar_id: str, account_id: str, *, title: str | None = UNSET,
                      description: str | None = UNSET, tags: Sequence[str] = UNSET, visibility: str = UNSET,
                      metadata: Mapping[str, Any] = UNSET) -> Avatar:
        """Update metadata fields given (UNSET = unchanged). Making a published avatar
        non-public unpublishes it. Raises AvatarNotFound, PermissionDenied, InvalidArgument."""
        changes: dict[str, Any] = {}
        for name, value in (("title", title), ("description", description)):
            if value is not UNSET:
                if value is not None and not isinstance(value, str):
                    raise InvalidArgument(name, "must be a string or null")
                changes[name] = value
        if tags is not UNSET:
            changes["tags"] = check_tags(tags)
        if metadata is not UNSET:
            if not isinstance(metadata, Mapping):
                raise InvalidArgument("metadata", "must be a JSON object")
            changes["metadata"] = dict(metadata)
        if visibility is not UNSET:
            check_choice(visibility, VISIBILITIES, "visibility")
            changes["visibility"] = visibility
            if visibility != Visibility.PUBLIC:
                changes.update(published=False, published_at=None)

        def work(conn: Connection) -> Avatar:
            row = self.owned_row(conn, avatar_id, account_id)
            if not changes:
                return to_avatar(row)
            if changes.get("visibility") == Visibility.PUBLIC:
                check_publishable(row)
            extra = {}
            if changes.get("visibility", Visibility.PUBLIC) != Visibility.PUBLIC and row["visibility"] == Visibility.PUBLIC:
                extra["link_epoch"] = A.c.link_epoch + 1  # its public (and older signed) links stop working
            return to_avatar(conn.execute(update(A).where(A.c.id == avatar_id)
                                          .values(**changes, **extra, updated_at=self._now())
                                          .returning(*A.c)).mappings().one())

        return self.db.run(work)

    def publish_avatar(self, avatar_id: str, account_id: str) -> Avatar:
        """completed + own -> visibility public, published, published_at, and an
        `avatar.published` outbox event (only on the first publish; repeating is a no-op).
        Raises AvatarNotFound, PermissionDenied, InvalidState (not completed)."""
        def work(conn: Connection) -> Avatar:
            row = self.owned_row(conn, avatar_id, account_id, "publish")
            if row["status"] != JobStatus.COMPLETED:
                raise InvalidState(avatar_id, row["status"], "only completed avatars can be published")
            if bool(row["published"]) and row["visibility"] == Visibility.PUBLIC:
                return to_avatar(row)
            check_publishable(row)
            now = self._now()
            avatar = to_avatar(conn.execute(
                update(A).where(A.c.id == avatar_id)
                .values(visibility=Visibility.PUBLIC, published=True, published_at=now, updated_at=now)
                .returning(*A.c)).mappings().one())
            self.emit(conn, EventType.AVATAR_PUBLISHED, avatar)
            return avatar

        return self.db.run(work)

    def delete_avatar(self, avatar_id: str, account_id: str) -> Avatar:
        """Delete the avatar with its likes and comments; a queued/processing job is cancelled
        and refunded first. Returns the final record (status `cancelled` if it was running) so
        the caller can delete the image assets in `result`. Raises AvatarNotFound,
        PermissionDenied."""
        def work(conn: Connection) -> Avatar:
            avatar = to_avatar(self.owned_row(conn, avatar_id, account_id, "delete"))
            if avatar.status in ACTIVE_STATUSES:
                avatar = self._finish(conn, avatar_id, JobStatus.CANCELLED, token=None, code=JobErrorCode.CANCELLED,
                                      message="deleted by the user") or avatar
            conn.execute(delete(likes).where(likes.c.avatar_id == avatar_id))
            conn.execute(delete(comments).where(comments.c.avatar_id == avatar_id))
            conn.execute(delete(A).where(A.c.id == avatar_id))
            self.queue_asset_deletions(conn, [f"avatars/{avatar_id}", f"uploads/{avatar_id}",
                                              upload_prefix(avatar.params) or ""],
                                       AssetDeletionReason.AVATAR, avatar_id)
            return avatar

        return self.db.run(work)

    def feed(self, *, limit: int = 20, cursor: str | None = None, sort: str = "newest",
             offset: int | None = None) -> Page[Avatar]:
        """Published public avatars of everyone: `newest` (published_at desc) or `most_liked`
        (likes desc), id as tiebreak."""
        check_limit(limit)
        if sort not in values(FeedSort):
            raise InvalidArgument("sort", f"must be newest or most_liked, got {sort!r}")
        column = A.c.published_at if sort == FeedSort.NEWEST else A.c.likes
        stmt = select(A).where(A.c.published == true(), A.c.visibility == Visibility.PUBLIC)
        return self.db.read(lambda c: page(c, stmt, column, A.c.id, "desc", str(sort), limit, cursor,
                                           to_avatar, offset))


def check_publishable(row: Mapping[str, Any]) -> None:
    """Public visibility and publishing need every delivered image to have passed the safety
    check (the worker stores `publishable: false` otherwise)."""
    if (row["result"] or {}).get("publishable") is False:
        raise NotPublishable(row["id"])
