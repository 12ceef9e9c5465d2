-- Two databases in one PostgreSQL cluster: the hub's and Rasa's tracker store.
-- Passwords are set from the environment by init.sh (never written here).
CREATE ROLE xiaozhi LOGIN;
CREATE DATABASE xiaozhi OWNER xiaozhi;
CREATE ROLE rasa LOGIN;
CREATE DATABASE rasa OWNER rasa;
