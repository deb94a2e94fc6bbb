-- The protobuf columns, converted to the stored forms of 0004 by the coordinator before this runs.
ALTER TABLE model_variants DROP COLUMN info;
ALTER TABLE platforms DROP COLUMN descriptor;
ALTER TABLE agents DROP COLUMN inventory;
ALTER TABLE jobs DROP COLUMN spec;
ALTER TABLE tasks DROP COLUMN config;
ALTER TABLE runs DROP COLUMN summary;
ALTER TABLE windows DROP COLUMN body;
