-- release: give up the caller's lease after its load failed, so the next
-- reader does not wait for it. A lease-only entry is deleted; a value that
-- was being refreshed goes back to being a plain value for the rest of its
-- stale window.
-- KEYS[1]  the entry key
-- ARGV[1]  the caller's 16-byte lease token
-- ARGV[2]  milliseconds a refreshed value may still live ("0": delete it)
-- ARGV[3]  the channel that wakes waiters, or "": for a contended lease,
--          "<len(key)>:<key>" is published there once it is deleted, so a
--          waiter takes over at once; with "" the reply says so and the
--          caller publishes (as in fill.lua)
-- Returns 1 when released, 2 when a contended lease was deleted and nothing
-- was published (ARGV[3] ""), 0 when the lease was no longer there.
local cur = redis.pcall('GET', KEYS[1])
if type(cur) ~= 'string' or #cur < 40 or string.sub(cur, 5, 20) ~= ARGV[1] then
  return 0
end
local kind = string.byte(cur, 3)
if kind == 3 or (kind == 4 and tonumber(ARGV[2]) <= 0) then
  redis.call('DEL', KEYS[1])
  if kind == 3 and string.sub(cur, 29, 32) ~= '\0\0\0\0' then
    if ARGV[3] == nil or ARGV[3] == '' then
      return 2
    end
    redis.pcall('PUBLISH', ARGV[3], #KEYS[1] .. ':' .. KEYS[1]) -- pcall: as in fill.lua
  end
  return 1
end
if kind == 4 then
  -- back to a plain value; the lease deadline in the load-time field goes
  redis.call('SET', KEYS[1], string.sub(cur, 1, 2) .. '\1' .. string.sub(cur, 4, 28) .. '\0\0\0\0' .. string.sub(cur, 33), 'PX', ARGV[2])
  return 1
end
return 0
