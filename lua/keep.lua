-- keep: end a refresh whose reload found the value unchanged. While the key
-- still holds the caller's refresh lease (and, in a namespace, the
-- generation is the entry's), the entry becomes a plain value again with a
-- new header (soft expiry, load time) and the payload it already holds:
-- its life is extended and the value is not sent again.
-- KEYS[1]  the entry key
-- KEYS[2]  the namespace generation key (namespaced caches only)
-- ARGV[1]  the caller's 16-byte lease token
-- ARGV[2]  the new header's first 32 bytes (kind value, codec, the token,
--          soft expiry, load time)
-- ARGV[3]  the entry's lifetime in milliseconds
-- ARGV[4]  lifetime of the generation key in milliseconds (namespaced caches)
-- Returns 1 when kept (or already kept by a retry of this call), else 0.
local cur = redis.pcall('GET', KEYS[1])
if type(cur) ~= 'string' or #cur < 40 or string.sub(cur, 1, 2) ~= string.sub(ARGV[2], 1, 2)
    or string.sub(cur, 5, 20) ~= ARGV[1] then
  return 0
end
local kind = string.byte(cur, 3)
if kind == 1 and string.sub(cur, 1, 32) == ARGV[2] then
  return 1 -- a retry of this call
end
if kind ~= 4 then
  return 0
end
if #KEYS > 1 then
  local gen = redis.pcall('GET', KEYS[2])
  if type(gen) ~= 'string' or gen ~= string.sub(cur, 33, 40) then
    return 0
  end
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
redis.call('SET', KEYS[1], ARGV[2] .. string.sub(cur, 33), 'PX', ARGV[3])
return 1
