"""Likes and comments: exact counters on the avatar row, events for the owner, same transaction."""
from __future__ import annotations

from typing import Any, Mapping

from sqlalchemy import Connection, delete, select, update

from ..vocab import SORT_ORDERS, EventType
from .base import StorePart, check_choice, check_limit, dialect_insert, new_id, page
from .jobs import to_avatar
from .records import AvatarNotFound, Comment, InvalidArgument, LikeResult, Page
from .schema import avatars as A, comments as C, likes as L

MAX_COMMENT_CHARS = 2000


def to_comment(r: Mapping[str, Any]) -> Comment:
    return Comment(id=r["id"], avatar_id=r["avatar_id"], account_id=r["account_id"], text=r["text"],
                   created_at=r["created_at"])


def _likes(conn: Connection, avatar_id: str) -> int | None:
    return conn.execute(select(A.c.likes).where(A.c.id == avatar_id)).scalar()


class CommunityStore(StorePart):
    def like(self, avatar_id: str, account_id: str) -> LikeResult:
        """Like once per account; a repeat is a no-op (changed=False). A new like increments the
        count and writes an `avatar.liked` event for the owner in the same transaction.
        Raises AvatarNotFound."""
        def work(conn: Connection) -> LikeResult:
            if _likes(conn, avatar_id) is None:
                raise AvatarNotFound(avatar_id)
            inserted = conn.execute(dialect_insert(conn, L).values(avatar_id=avatar_id, account_id=account_id,
                                                                   created_at=self._now())
                                    .on_conflict_do_nothing(index_elements=["avatar_id", "account_id"])
                                    .returning(L.c.avatar_id)).first()
            if inserted is None:
                return LikeResult(False, _likes(conn, avatar_id) or 0)
            row = conn.execute(update(A).where(A.c.id == avatar_id).values(likes=A.c.likes + 1)
                               .returning(*A.c)).mappings().first()
            if row is None:  # deleted concurrently: roll the like back
                raise AvatarNotFound(avatar_id)
            avatar = to_avatar(row)
            self.emit(conn, EventType.AVATAR_LIKED, avatar, {"liked_by": account_id})
            return LikeResult(True, avatar.likes)

        return self.db.run(work)

    def unlike(self, avatar_id: str, account_id: str) -> LikeResult:
        """Remove the account's like if any. Raises AvatarNotFound."""
        def work(conn: Connection) -> LikeResult:
            if _likes(conn, avatar_id) is None:
                raise AvatarNotFound(avatar_id)
            removed = conn.execute(delete(L).where(L.c.avatar_id == avatar_id, L.c.account_id == account_id)).rowcount
            if removed:
                count = conn.execute(update(A).where(A.c.id == avatar_id).values(likes=A.c.likes - 1)
                                     .returning(A.c.likes)).scalar()
            else:
                count = _likes(conn, avatar_id)
            if count is None:
                raise AvatarNotFound(avatar_id)
            return LikeResult(bool(removed), int(count))

        return self.db.run(work)

    def has_liked(self, avatar_id: str, account_id: str) -> bool:
        """Whether the account currently likes the avatar."""
        stmt = select(L.c.avatar_id).where(L.c.avatar_id == avatar_id, L.c.account_id == account_id)
        return self.db.read(lambda c: c.execute(stmt).first() is not None)

    def add_comment(self, avatar_id: str, account_id: str, text: str) -> Comment:
        """Insert a comment (1..2000 chars, else InvalidArgument), increment the count and
        write an `avatar.commented` event for the owner. Raises AvatarNotFound."""
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_COMMENT_CHARS:
            raise InvalidArgument("text", f"must be 1..{MAX_COMMENT_CHARS} characters")
        comment_id = new_id("cm")

        def work(conn: Connection) -> Comment:
            row = conn.execute(update(A).where(A.c.id == avatar_id).values(comments=A.c.comments + 1)
                               .returning(*A.c)).mappings().first()
            if row is None:
                raise AvatarNotFound(avatar_id)
            comment = Comment(comment_id, avatar_id, account_id, text, self._now())
            conn.execute(C.insert().values(id=comment.id, avatar_id=avatar_id, account_id=account_id, text=text,
                                           created_at=comment.created_at))
            self.emit(conn, EventType.AVATAR_COMMENTED, to_avatar(row),
                      {"comment": {"id": comment_id, "account_id": account_id, "text": text,
                                   "created_at": comment.created_at}})
            return comment

        return self.db.run(work)

    def list_comments(self, avatar_id: str, *, limit: int = 20, cursor: str | None = None,
                      sort_order: str = "asc", offset: int | None = None) -> Page[Comment]:
        """Comments of an avatar, oldest first by default, cursor-paginated."""
        check_limit(limit)
        check_choice(sort_order, SORT_ORDERS, "sortOrder")
        stmt = select(C).where(C.c.avatar_id == avatar_id)
        return self.db.read(lambda c: page(c, stmt, C.c.created_at, C.c.id, sort_order, sort_order,
                                           limit, cursor, to_comment, offset))
