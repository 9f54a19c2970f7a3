// Negative caching: what the lecture calls the NOT_FOUND sentinel, here the
// "not found" tombstone, an entry kind of its own.

package cacheaside

import (
	"errors"
	"time"

	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
)

// Negative caching. When the loader reports that an item does not exist,
// the cache stores a tombstone: an entry of kind "not found" with no
// payload, written under the loader's lease like any value and living for
// the policy's NegativeTTL. It is a distinct entry kind in the header, not
// a magic string, so no real value can ever be mistaken for it. A Get that
// finds a tombstone returns ErrNotFound without calling the loader.
//
// Only "not found" is cached. Loader errors, panics, timeouts and
// cancellations are never written; the lease is released at once so the
// next Get tries again.

// isNotFound reports whether a loader error means "the item does not exist".
// A panic is never "not found", whatever value it carried.
func (c *Cache[T]) isNotFound(err error) bool {
	if err == nil {
		return false
	}
	if _, panicked := err.(*PanicError); panicked {
		return false
	}
	return errors.Is(err, ErrNotFound) || (c.opts.IsNotFound != nil && c.opts.IsNotFound(err))
}

// tombstone encodes the "not found" entry written under tok at written, in
// namespace generation gen, expiring (by the cache's clock) at soft.
func tombstone(tok envelope.Token, format byte, gen envelope.Gen, written, soft time.Time) []byte {
	return envelope.Encode(&envelope.Entry{Kind: envelope.NotFound, Format: format, Token: tok, Gen: gen, SoftExpiry: soft.UnixMilli(), Written: written.UnixMilli()})
}
