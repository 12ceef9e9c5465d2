--
-- PostgreSQL database dump
--

\restrict gI9COSb61YDyoPmyYIY2xPGdtoPimffJNOT2Dfcvrdw9hBO51fHBCoHkR0ZGvcX

-- Dumped from database version 15.18 (Debian 15.18-0+deb12u1)
-- Dumped by pg_dump version 15.18 (Debian 15.18-0+deb12u1)

SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

SET default_tablespace = '';

SET default_table_access_method = heap;

--
-- Name: audit_log; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.audit_log (
    id integer NOT NULL,
    at timestamp with time zone NOT NULL,
    actor character varying(64) NOT NULL,
    role character varying(16) NOT NULL,
    action character varying(64) NOT NULL,
    target character varying(128) NOT NULL,
    detail json NOT NULL,
    client character varying(64) NOT NULL
);


--
-- Name: audit_log_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.audit_log_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: audit_log_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.audit_log_id_seq OWNED BY public.audit_log.id;


--
-- Name: conversations; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.conversations (
    id character varying(36) NOT NULL,
    token_hash character varying(64) NOT NULL,
    channel character varying(16) NOT NULL,
    region_code character varying(6) NOT NULL,
    status character varying(16) NOT NULL,
    contact character varying(32) NOT NULL,
    entry_point character varying(128) NOT NULL,
    meta json NOT NULL,
    created_at timestamp with time zone NOT NULL,
    updated_at timestamp with time zone NOT NULL,
    closed_at timestamp with time zone
);


--
-- Name: escalations; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.escalations (
    id integer NOT NULL,
    conversation_id character varying(36) NOT NULL,
    channel character varying(16) NOT NULL,
    reason character varying(32) NOT NULL,
    status character varying(16) NOT NULL,
    created_at timestamp with time zone NOT NULL,
    priority integer NOT NULL,
    topic character varying(32) NOT NULL,
    agent character varying(64) NOT NULL,
    claimed_at timestamp with time zone,
    closed_at timestamp with time zone,
    disposition character varying(32) NOT NULL,
    summary json NOT NULL
);


--
-- Name: escalations_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.escalations_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: escalations_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.escalations_id_seq OWNED BY public.escalations.id;


--
-- Name: login_failures; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.login_failures (
    id integer NOT NULL,
    username character varying(64) NOT NULL,
    client character varying(64) NOT NULL,
    at timestamp with time zone NOT NULL
);


--
-- Name: login_failures_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.login_failures_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: login_failures_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.login_failures_id_seq OWNED BY public.login_failures.id;


--
-- Name: messages; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.messages (
    id integer NOT NULL,
    conversation_id character varying(36) NOT NULL,
    seq integer NOT NULL,
    role character varying(16) NOT NULL,
    text text NOT NULL,
    status character varying(16) NOT NULL,
    meta json NOT NULL,
    reply_to integer,
    created_at timestamp with time zone NOT NULL
);


--
-- Name: messages_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.messages_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: messages_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.messages_id_seq OWNED BY public.messages.id;


--
-- Name: staff_sessions; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.staff_sessions (
    token_hash character varying(64) NOT NULL,
    user_id integer NOT NULL,
    created_at timestamp with time zone NOT NULL,
    expires_at timestamp with time zone NOT NULL,
    revoked_at timestamp with time zone,
    client character varying(64) NOT NULL
);


--
-- Name: staff_users; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.staff_users (
    id integer NOT NULL,
    username character varying(64) NOT NULL,
    display_name character varying(64) NOT NULL,
    role character varying(16) NOT NULL,
    password_hash character varying(256) NOT NULL,
    skills json NOT NULL,
    active boolean NOT NULL,
    created_at timestamp with time zone NOT NULL
);


--
-- Name: staff_users_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.staff_users_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: staff_users_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.staff_users_id_seq OWNED BY public.staff_users.id;


--
-- Name: surveys; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.surveys (
    id integer NOT NULL,
    conversation_id character varying(36) NOT NULL,
    channel character varying(16) NOT NULL,
    region_code character varying(6) NOT NULL,
    reason character varying(32) NOT NULL,
    status character varying(16) NOT NULL,
    due_at timestamp with time zone NOT NULL,
    attempts integer NOT NULL,
    last_error character varying(200) NOT NULL,
    rating integer,
    comment text NOT NULL,
    answered_via character varying(16) NOT NULL,
    created_at timestamp with time zone NOT NULL,
    answered_at timestamp with time zone
);


--
-- Name: surveys_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.surveys_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: surveys_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.surveys_id_seq OWNED BY public.surveys.id;


--
-- Name: audit_log id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.audit_log ALTER COLUMN id SET DEFAULT nextval('public.audit_log_id_seq'::regclass);


--
-- Name: escalations id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.escalations ALTER COLUMN id SET DEFAULT nextval('public.escalations_id_seq'::regclass);


--
-- Name: login_failures id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.login_failures ALTER COLUMN id SET DEFAULT nextval('public.login_failures_id_seq'::regclass);


--
-- Name: messages id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.messages ALTER COLUMN id SET DEFAULT nextval('public.messages_id_seq'::regclass);


--
-- Name: staff_users id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.staff_users ALTER COLUMN id SET DEFAULT nextval('public.staff_users_id_seq'::regclass);


--
-- Name: surveys id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.surveys ALTER COLUMN id SET DEFAULT nextval('public.surveys_id_seq'::regclass);


--
-- Data for Name: audit_log; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.audit_log VALUES (1, '2026-12-06 16:44:14.317095+08', 'cli', '', 'user.create', 'li.agent', '{"role": "agent"}', '');


--
-- Data for Name: conversations; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.conversations VALUES ('e0f218fa-eda4-4021-bc9e-050b32847273', '67fa4dc232a5446101529f1ff6de0af1b2248c272057df8359832ae796736df8', 'web', '330100', 'closed', '', 'https://ybj.example.gov.cn/', '{"visitor": "v-0123456789abcdef"}', '2026-12-06 16:44:14.325589+08', '2026-12-06 16:44:14.356577+08', '2026-12-06 16:44:14.356571+08');
INSERT INTO public.conversations VALUES ('16b802bd-47ea-49b7-8103-6b6d0f0259f9', 'd0dc633aa11e432fb8bb2da4f5698f4f33620a2db06c9b5f716b4ea3d6b3d67b', 'phone', '330102', 'open', '138****5678', '12393', '{}', '2026-12-06 16:44:14.36403+08', '2026-12-06 16:44:14.364036+08', NULL);


--
-- Data for Name: escalations; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.escalations VALUES (1, '16b802bd-47ea-49b7-8103-6b6d0f0259f9', 'phone', 'requested', 'waiting', '2026-12-06 16:44:14.378719+08', 2, 'cross_region', '', NULL, NULL, '', '{"want": "\u5f02\u5730\u5c31\u533b\u5907\u6848\u8fdb\u5ea6"}');


--
-- Data for Name: login_failures; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.login_failures VALUES (1, 'admin', '203.0.113.9', '2026-12-06 16:44:14.382993+08');


--
-- Data for Name: messages; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.messages VALUES (2, 'e0f218fa-eda4-4021-bc9e-050b32847273', 2, 'bot', '您可以在国家医保服务平台App上办理异地就医备案，备案后直接结算。', 'answered', '{"citations": ["cross_region.filing"]}', 1, '2026-12-06 16:44:14.340933+08');
INSERT INTO public.messages VALUES (1, 'e0f218fa-eda4-4021-bc9e-050b32847273', 1, 'resident', '异地就医怎么备案？', 'answered', '{}', NULL, '2026-12-06 16:44:14.330583+08');
INSERT INTO public.messages VALUES (3, '16b802bd-47ea-49b7-8103-6b6d0f0259f9', 1, 'resident', '我要转人工', 'received', '{}', NULL, '2026-12-06 16:44:14.36634+08');


--
-- Data for Name: staff_sessions; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: staff_users; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.staff_users VALUES (1, 'admin', '管理员', 'admin', '$argon2id$v=19$m=65536,t=3,p=4$iVKmpB9cvjwrA9KM2ElC/g$4mGs/6gAUO5YRJKlF07mdjRnEozjO2TA71+5ZwvKIVM', '[]', true, '2026-12-06 16:44:14.066148+08');
INSERT INTO public.staff_users VALUES (2, 'li.agent', '李工', 'agent', '$argon2id$v=19$m=65536,t=3,p=4$12l1l+oltz//wYae7djdOg$SpTbhaLtEQfmTyQ7NT6C91oFF2GZ+ItMd+1VrB3Ehz8', '["cross_region"]', true, '2026-12-06 16:44:14.306205+08');


--
-- Data for Name: surveys; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.surveys VALUES (1, 'e0f218fa-eda4-4021-bc9e-050b32847273', 'web', '330100', 'resident_left', 'answered', '2026-12-06 16:44:14.386003+08', 0, '', 5, '很清楚，谢谢', 'chat', '2026-12-06 16:44:14.386006+08', '2026-12-06 16:44:14.382898+08');


--
-- Name: audit_log_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.audit_log_id_seq', 1, true);


--
-- Name: escalations_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.escalations_id_seq', 1, true);


--
-- Name: login_failures_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.login_failures_id_seq', 1, true);


--
-- Name: messages_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.messages_id_seq', 3, true);


--
-- Name: staff_users_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.staff_users_id_seq', 2, true);


--
-- Name: surveys_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.surveys_id_seq', 1, true);


--
-- Name: audit_log audit_log_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.audit_log
    ADD CONSTRAINT audit_log_pkey PRIMARY KEY (id);


--
-- Name: conversations conversations_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.conversations
    ADD CONSTRAINT conversations_pkey PRIMARY KEY (id);


--
-- Name: escalations escalations_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.escalations
    ADD CONSTRAINT escalations_pkey PRIMARY KEY (id);


--
-- Name: login_failures login_failures_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.login_failures
    ADD CONSTRAINT login_failures_pkey PRIMARY KEY (id);


--
-- Name: messages messages_conversation_id_seq_key; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.messages
    ADD CONSTRAINT messages_conversation_id_seq_key UNIQUE (conversation_id, seq);


--
-- Name: messages messages_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.messages
    ADD CONSTRAINT messages_pkey PRIMARY KEY (id);


--
-- Name: staff_sessions staff_sessions_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.staff_sessions
    ADD CONSTRAINT staff_sessions_pkey PRIMARY KEY (token_hash);


--
-- Name: staff_users staff_users_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.staff_users
    ADD CONSTRAINT staff_users_pkey PRIMARY KEY (id);


--
-- Name: surveys surveys_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.surveys
    ADD CONSTRAINT surveys_pkey PRIMARY KEY (id);


--
-- Name: ix_audit_log_at; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_audit_log_at ON public.audit_log USING btree (at);


--
-- Name: ix_conversations_token_hash; Type: INDEX; Schema: public; Owner: -
--

CREATE UNIQUE INDEX ix_conversations_token_hash ON public.conversations USING btree (token_hash);


--
-- Name: ix_escalations_conversation_id; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_escalations_conversation_id ON public.escalations USING btree (conversation_id);


--
-- Name: ix_login_failures_at; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_login_failures_at ON public.login_failures USING btree (at);


--
-- Name: ix_login_failures_username_at; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_login_failures_username_at ON public.login_failures USING btree (username, at);


--
-- Name: ix_messages_conversation_id; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_messages_conversation_id ON public.messages USING btree (conversation_id);


--
-- Name: ix_staff_sessions_user_id; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_staff_sessions_user_id ON public.staff_sessions USING btree (user_id);


--
-- Name: ix_staff_users_username; Type: INDEX; Schema: public; Owner: -
--

CREATE UNIQUE INDEX ix_staff_users_username ON public.staff_users USING btree (username);


--
-- Name: ix_surveys_conversation_id; Type: INDEX; Schema: public; Owner: -
--

CREATE UNIQUE INDEX ix_surveys_conversation_id ON public.surveys USING btree (conversation_id);


--
-- Name: ix_surveys_due_at; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_surveys_due_at ON public.surveys USING btree (due_at);


--
-- Name: ix_surveys_status; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_surveys_status ON public.surveys USING btree (status);


--
-- Name: uq_escalations_open_conversation; Type: INDEX; Schema: public; Owner: -
--

CREATE UNIQUE INDEX uq_escalations_open_conversation ON public.escalations USING btree (conversation_id) WHERE ((status)::text = ANY ((ARRAY['waiting'::character varying, 'claimed'::character varying, 'callback'::character varying])::text[]));


--
-- Name: escalations escalations_conversation_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.escalations
    ADD CONSTRAINT escalations_conversation_id_fkey FOREIGN KEY (conversation_id) REFERENCES public.conversations(id);


--
-- Name: messages messages_conversation_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.messages
    ADD CONSTRAINT messages_conversation_id_fkey FOREIGN KEY (conversation_id) REFERENCES public.conversations(id);


--
-- Name: staff_sessions staff_sessions_user_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.staff_sessions
    ADD CONSTRAINT staff_sessions_user_id_fkey FOREIGN KEY (user_id) REFERENCES public.staff_users(id);


--
-- Name: surveys surveys_conversation_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.surveys
    ADD CONSTRAINT surveys_conversation_id_fkey FOREIGN KEY (conversation_id) REFERENCES public.conversations(id);


--
-- PostgreSQL database dump complete
--

\unrestrict gI9COSb61YDyoPmyYIY2xPGdtoPimffJNOT2Dfcvrdw9hBO51fHBCoHkR0ZGvcX

